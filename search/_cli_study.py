"""``edgeslim search``, ``worker``, ``inventory`` and ``refine``: each command registers its own arguments.

Heavy modules (torch, optuna, plotly) are imported inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["cmd_inventory", "cmd_refine", "cmd_search", "cmd_worker", "register"]


def _spec_from_args(args: argparse.Namespace) -> Any:
    from edgeslim.search._spec import DeviceSpec, demo_spec, load_spec

    spec = load_spec(args.spec) if args.spec else demo_spec()
    changes: dict[str, Any] = {}
    if args.workload:
        changes["model"] = dataclasses.replace(spec.model, builtin=args.workload, factory="", torchvision="")
        if not args.spec:
            if not args.name:
                changes["name"] = args.workload
            # the demo's per-layer rules name the digits CNN's layers; another built-in keeps the default rule
            rules = {k: v for k, v in spec.space.rules.items() if k == "_default"}
            changes["space"] = dataclasses.replace(spec.space, rules=rules)
    for key in ("trials", "storage", "sampler", "seed", "name"):
        value = getattr(args, key, None)
        if value is not None:
            changes[key] = value
    if args.out:
        changes["out_dir"] = args.out
    if args.device or args.threads:
        changes["device"] = DeviceSpec(name=args.device or spec.device.name,
                                       threads=args.threads or spec.device.threads)
    if getattr(args, "score", None):
        changes["finetune"] = dataclasses.replace(spec.finetune, score=args.score)
    from edgeslim.search._budgets import SEARCH_BUDGETS

    budgets = {k: getattr(args, k) for k in SEARCH_BUDGETS if getattr(args, k, None) is not None}
    if budgets:
        changes["budgets"] = dataclasses.replace(spec.budgets, **budgets)
    return spec.replace(**changes) if changes else spec


def _front_table(front: list[dict[str, Any]], names: list[str]) -> str:
    refined = any(e.get("refined") for e in front)
    label_free = any("label-free" in str(e.get("accuracy_method", "")) for e in front)
    header = (f"{'trial':>5} {'preset':<24} {'agree' if label_free else 'acc':>7} " + (f"{'search':>7} " if refined else "")
              + f"{'Δacc pp':>8} {'size KB':>9} {'lat ms':>8} {'p95 ms':>8} {'x dense':>8} {'energy mJ*':>10}  plan")
    lines = [header, "-" * len(header)]
    for e in front:
        vs = e.get("vs_baseline", {})
        search = e.get("search", {}).get("accuracy", float("nan")) if e.get("refined") else float("nan")
        lines.append(
            f"{e['trial']:>5} {e.get('preset', '')[:24]:<24} {e.get('accuracy', float('nan')):>7.4f} "
            + (f"{search:>7.4f} " if refined else "")
            + f"{vs.get('accuracy_drop_pp', float('nan')):>8.2f} {e.get('size_bytes', float('nan')) / 1e3:>9.2f} "
            f"{e.get('latency_ms', float('nan')):>8.4f} {e.get('latency_p95_ms', float('nan')):>8.4f} "
            f"{vs.get('latency_speedup', float('nan')):>8.2f} "
            f"{e.get('energy_mj', float('nan')):>10.4f}  {e.get('plan_summary', '')}")
    if label_free:
        lines.append("label-free data: 'agree' is top-1 agreement with the dense model, not accuracy")
    lines.append("* energy is an estimate from documented constants, not a measurement"
                 + ("; x dense: latency ratio timed side by side with the dense artifact"
                    if any("latency_speedup_paired" in e for e in front) else ""))
    return "\n".join(lines)


def cmd_search(args: argparse.Namespace) -> int:
    """Run or resume a study; print the front and the report path."""
    from edgeslim.search._storage import shown_url
    from edgeslim.search._study import run_search

    spec = _spec_from_args(args)
    result = run_search(spec, devices_dir=Path(args.devices_dir), jobs=args.jobs)
    if args.format == "json":
        print(json.dumps(result.front, indent=2, default=float))
        return result.exit_code
    print(_front_table(result.front, result.objective_names))
    if result.exit_code:
        print("stopped early by a signal: the front covers the trials that completed; re-run the same command "
              "to add the rest")
    if not result.front and spec.budgets.active():
        print(f"no completed trial meets the budgets {spec.budgets.active()}; relax them or run more trials")
    print(f"\nreport: {result.report_path}\nfront:  {result.out_dir / 'pareto.json'}  "
          f"{result.out_dir / 'pareto.csv'}\nstudy:  {shown_url(spec.storage_url)} "
          "(re-run the same command to add trials)")
    return result.exit_code


def cmd_worker(args: argparse.Namespace) -> int:
    """Join a study in shared storage (PostgreSQL for several machines) and run trials for it."""
    import optuna

    from edgeslim.search._spec import load_spec, spec_from_dict
    from edgeslim.search._storage import open_storage, shown_url
    from edgeslim.search._study import finished_trials, run_search
    from edgeslim.spaces import SpecError

    if args.spec:
        spec = load_spec(args.spec)
        if args.storage:
            spec = spec.replace(storage=args.storage)
    else:
        if not args.storage:
            raise SpecError("worker needs a SPEC or --storage URL of a running study (e.g. "
                            "postgresql+psycopg://user:pass@host/db)")
        storage = open_storage(args.storage, 60)
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        name = args.name or (names[0] if len(names) == 1 else None)
        if name is None:
            raise SpecError(f"{shown_url(args.storage)} holds {len(names)} studies ({names}); pass --name")
        if name not in names:
            raise SpecError(f"no study {name!r} in {shown_url(args.storage)}; studies there: {names or 'none'}; "
                            "pass --name, or the SPEC to create it")
        stored = optuna.load_study(study_name=name, storage=storage).user_attrs.get("spec")
        if not isinstance(stored, dict):
            raise SpecError(f"study {name!r} in {shown_url(args.storage)} holds no edgeslim spec; pass the SPEC file")
        spec = spec_from_dict(stored).replace(storage=args.storage)
    changes = {k: v for k, v in (("name", args.name), ("trials", args.trials), ("out_dir", args.out)) if v}
    spec = spec.replace(**changes) if changes else spec
    result = run_search(spec, devices_dir=Path(args.devices_dir), torch_threads=args.torch_threads, role="worker")
    done = finished_trials(result.study)
    print(f"worker done: study {spec.name!r} in {shown_url(spec.storage_url)} holds {done} finished trials; its "
          "front: edgeslim search with the same spec and storage, or pick/refine on the study folder")
    return result.exit_code


def cmd_inventory(args: argparse.Namespace) -> int:
    """List the model's layers, pruning groups and knobs without searching."""
    from edgeslim.search._study import spec_device, study_space
    from edgeslim.search._workloads import load_workload

    spec = _spec_from_args(args)
    work = load_workload(spec, spec.output_dir, lambda m: print(m, file=sys.stderr))
    space = study_space(spec, work, spec_device(spec, Path(args.devices_dir)))
    if args.format == "json":
        print(json.dumps({
            "layers": [dataclasses.asdict(l) for l in space.layers],
            "groups": [dataclasses.asdict(g) for g in space.groups],
            "knobs": {k: list(d.choices) for k, d in space.distributions().items()},
            "excluded": space.excluded,
        }, indent=2))
        return 0
    print(f"{'layer':<28} {'kind':<7} {'in':>5} {'out':>5} {'kernel':<8} {'groups':>6} {'params':>9} {'MACs':>11}")
    for l in space.layers:
        print(f"{l.name:<28} {l.kind:<7} {l.in_channels:>5} {l.out_channels:>5} {str(l.kernel_size):<8} "
              f"{l.groups:>6} {l.params:>9} {l.macs:>11}")
    print("\npruning groups (coupled layers share one sparsity knob):")
    for g in space.groups:
        print(f"  {g.name:<26} {g.channels:>5} ch  members: {', '.join(g.members)}")
    print("\nknobs:")
    for name, dist in space.distributions().items():
        print(f"  {name:<36} {list(dist.choices)}")
    for name, why in space.excluded.items():
        what = "low rank" if name.endswith(" (rank)") else "pruning"
        print(f"  left out of {what}: {name.removesuffix(' (rank)')}: {why}")
    return 0


def cmd_refine(args: argparse.Namespace) -> int:
    """Fine-tune the front (and trials near it) longer and re-score each on its exported artifact."""
    from edgeslim.search._refine import refine_study

    result = refine_study(Path(args.study), args.storage, args.steps, args.lr, args.margin_pp,
                          Path(args.devices_dir))
    if args.format == "json":
        print(json.dumps(result.front, indent=2, default=float))
        return 0
    names = [n for n in ("accuracy", "size_bytes", "latency_ms", "energy_mj") if result.front and n in result.front[0]]
    print(_front_table(result.front, names))
    print(f"refined {len(result.trials)} trials ({result.steps} steps at lr {result.lr:g}) in "
          f"{result.seconds:.0f} s; accuracy is the exported artifact's, against the dense baseline's artifact\n"
          f"front:  {result.out_dir / 'pareto.json'}  {result.out_dir / 'pareto.csv'}\n"
          f"report: {result.out_dir / 'report.html'}")
    return 0


def _add_spec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", help="study spec (TOML); default: the built-in digits demo")
    from edgeslim.search._registry import BUILTIN_WORKLOADS

    p.add_argument("--workload", choices=list(BUILTIN_WORKLOADS),
                   help="built-in model instead of the spec's (digits-resnet: residual, >= 1 ms)")
    p.add_argument("--name", help="study name (default from the spec)")
    p.add_argument("--out", help="output folder (default studies/<name>)")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite in the output folder)")
    p.add_argument("--device", help="target device; 'local' measures on this machine")
    p.add_argument("--threads", type=int, help="intra-op threads for latency measurement")
    p.add_argument("--seed", type=int)
    p.add_argument("--devices-dir", default="studies/devices", help="where calibrated profiles live")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--score", choices=["torch", "artifact"],
                   help="accuracy of the fine-tuned torch candidate (default) or of its exported ONNX artifact")


def register(sub: Any) -> None:
    """Add ``search``, ``inventory`` and ``refine`` to the CLI's subparsers."""
    p = sub.add_parser("search", help="run or resume a compression search (default: built-in digits demo)",
                       description=cmd_search.__doc__)
    p.set_defaults(func=cmd_search)
    _add_spec_options(p)
    p.add_argument("--trials", type=int, help="trials to add in this run")
    from edgeslim.search._budgets import BUDGETS, SEARCH_BUDGETS
    from edgeslim.search._registry import SAMPLERS

    p.add_argument("--sampler", help="; ".join(f"{k}: {v}" for k, v in SAMPLERS.items()))
    for budget in SEARCH_BUDGETS:
        p.add_argument("--" + budget.replace("_", "-"), type=float, help=f"budget: {BUDGETS[budget].help}")

    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes on this machine sharing the trials (one timing at a time)")

    p = sub.add_parser("worker", help="join a study in shared storage and run trials for it (scale-out)",
                       description=cmd_worker.__doc__)
    p.set_defaults(func=cmd_worker)
    p.add_argument("spec", nargs="?", help="study spec (TOML or JSON); default: the spec stored on the study")
    p.add_argument("--storage", help="Optuna storage URL the study lives in (needed without SPEC)")
    p.add_argument("--name", help="study name (default: the spec's, or the only study in the storage)")
    p.add_argument("--trials", type=int, help="trials this worker runs (default: the spec's)")
    p.add_argument("--out", help="folder for the base model cache and scratch files (default studies/<name>)")
    p.add_argument("--devices-dir", default="studies/devices", help="where calibrated profiles live")
    p.add_argument("--torch-threads", type=int, help="threads for fine-tuning (default: all cores)")

    p = sub.add_parser("inventory", help="list layers, pruning groups and knobs of a study's model",
                       description=cmd_inventory.__doc__)
    p.set_defaults(func=cmd_inventory)
    _add_spec_options(p)

    p = sub.add_parser("refine", help="fine-tune the front longer and re-score it on the exported artifacts",
                       description=cmd_refine.__doc__)
    p.set_defaults(func=cmd_refine)
    p.add_argument("study", help="study folder written by `edgeslim search` (e.g. studies/digits-demo)")
    p.add_argument("--steps", type=int, help="fine-tune steps (default [refine] steps, else 10x the search's)")
    p.add_argument("--lr", type=float, help="learning rate (default [refine] lr, else the search's)")
    p.add_argument("--margin-pp", type=float,
                   help="also refine trials this many accuracy points from the front (default 0.5)")
    p.add_argument("--storage", help="Optuna storage URL when the study is not in STUDY/study.db")
    p.add_argument("--devices-dir", default="studies/devices")
    p.add_argument("--format", choices=["table", "json"], default="table")

"""The ``edgeslim`` command line: one function per subcommand, registered in ``COMMANDS``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["main", "COMMANDS"]


def _spec_from_args(args: argparse.Namespace) -> Any:
    from edgeslim.search._spec import BudgetsSpec, DeviceSpec, demo_spec, load_spec

    spec = load_spec(args.spec) if args.spec else demo_spec()
    changes: dict[str, Any] = {}
    if args.workload:
        changes["model"] = dataclasses.replace(spec.model, builtin=args.workload, factory="", torchvision="")
        if not args.spec and not args.name:
            changes["name"] = args.workload
    for key in ("trials", "storage", "sampler", "seed", "name"):
        value = getattr(args, key, None)
        if value is not None:
            changes[key] = value
    if args.out:
        changes["out_dir"] = args.out
    if args.device or args.threads:
        changes["device"] = DeviceSpec(name=args.device or spec.device.name,
                                       threads=args.threads or spec.device.threads)
    budgets = {k: getattr(args, k) for k in ("max_latency_ms", "max_size_kb", "max_energy_mj", "min_accuracy")
               if getattr(args, k, None) is not None}
    if budgets:
        changes["budgets"] = dataclasses.replace(spec.budgets, **budgets) if spec.budgets else BudgetsSpec(**budgets)
    return spec.replace(**changes) if changes else spec


def _front_table(front: list[dict[str, Any]], names: list[str]) -> str:
    header = f"{'trial':>5} {'preset':<24} {'acc':>7} {'Δacc pp':>8} {'size KB':>9} {'lat ms':>8} {'p95 ms':>8} {'energy mJ*':>10}  plan"
    lines = [header, "-" * len(header)]
    for e in front:
        vs = e.get("vs_baseline", {})
        lines.append(
            f"{e['trial']:>5} {e.get('preset', '')[:24]:<24} {e.get('accuracy', float('nan')):>7.4f} "
            f"{vs.get('accuracy_drop_pp', float('nan')):>8.2f} {e.get('size_bytes', float('nan')) / 1e3:>9.2f} "
            f"{e.get('latency_ms', float('nan')):>8.4f} {e.get('latency_p95_ms', float('nan')):>8.4f} "
            f"{e.get('energy_mj', float('nan')):>10.4f}  {e.get('plan_summary', '')}")
    lines.append("* energy is an estimate from documented constants, not a measurement")
    return "\n".join(lines)


def cmd_search(args: argparse.Namespace) -> int:
    """Run or resume a study; print the front and the report path."""
    from edgeslim.search._study import run_search

    spec = _spec_from_args(args)
    result = run_search(spec)
    if args.format == "json":
        print(json.dumps(result.front, indent=2, default=float))
        return 0
    print(_front_table(result.front, result.objective_names))
    if not result.front and spec.budgets.active():
        print(f"no completed trial meets the budgets {spec.budgets.active()}; relax them or run more trials")
    print(f"\nreport: {result.report_path}\nfront:  {result.out_dir / 'pareto.json'}  "
          f"{result.out_dir / 'pareto.csv'}\nstudy:  {spec.storage_url} (re-run the same command to add trials)")
    return 0


def cmd_inventory(args: argparse.Namespace) -> int:
    """List the model's layers, pruning groups and knobs without searching."""
    from edgeslim.search._workloads import load_workload
    from edgeslim.spaces import CompressionSpace

    spec = _spec_from_args(args)
    work = load_workload(spec, spec.output_dir, lambda m: print(m, file=sys.stderr))
    space = CompressionSpace.build(work.model, work.example_input, spec.space.rule_set())
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
        print(f"  left out of pruning: {name}: {why}")
    return 0


def _add_spec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", help="study spec (TOML); default: the built-in digits demo")
    p.add_argument("--workload", choices=["digits-cnn", "digits-resnet"],
                   help="built-in model instead of the spec's (digits-resnet: residual, >= 1 ms)")
    p.add_argument("--name", help="study name (default from the spec)")
    p.add_argument("--out", help="output folder (default studies/<name>)")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite in the output folder)")
    p.add_argument("--device", help="target device; 'local' measures on this machine")
    p.add_argument("--threads", type=int, help="intra-op threads for latency measurement")
    p.add_argument("--seed", type=int)
    p.add_argument("--format", choices=["table", "json"], default="table")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeslim",
        description="Search channel sparsity x low rank x bit-width for an edge device; "
                    "get a Pareto front of accuracy against size, latency and energy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=fn.__doc__)
        _add_spec_options(p)
        if name == "search":
            p.add_argument("--trials", type=int, help="trials to add in this run")
            p.add_argument("--sampler", help="tpe (default), nsga2 or random")
            for flag, help_b in (("--max-latency-ms", "latency budget (ms)"), ("--max-size-kb", "size budget (kB)"),
                                 ("--max-energy-mj", "energy budget (mJ, estimated)"),
                                 ("--min-accuracy", "accuracy floor (0..1)")):
                p.add_argument(flag, type=float, help=help_b)
        p.set_defaults(func=fn)
    return parser


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "search": (cmd_search, "run or resume a compression search (default: built-in digits demo)"),
    "inventory": (cmd_inventory, "list layers, pruning groups and knobs of a study's model"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgeslim`` console script; returns the exit code.

    Usage errors (bad options, bad spec, impossible space) exit 2; other edgeslim errors 1.

    Example:
        >>> main(["--help"])  # doctest: +SKIP
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if not getattr(args, "command", None):
        parser.print_usage(sys.stderr)
        print("edgeslim: error: choose a command, e.g. `edgeslim search`", file=sys.stderr)
        return 2
    for key in ("trials", "threads"):
        value = getattr(args, key, None)
        if value is not None and value < 1:
            parser.print_usage(sys.stderr)
            print(f"edgeslim: error: --{key} must be >= 1, got {value}", file=sys.stderr)
            return 2
    from edgeslim.spaces import EdgeslimError, SpaceError, SpecError

    try:
        return args.func(args)
    except (SpecError, SpaceError) as e:
        parser.print_usage(sys.stderr)
        print(f"edgeslim: error: {e}", file=sys.stderr)
        return 2
    except EdgeslimError as e:
        print(f"edgeslim: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nedgeslim: interrupted; finished trials are stored, re-run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

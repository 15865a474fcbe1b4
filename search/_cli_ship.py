"""``edgeslim pick``, ``export`` and ``variants``: shipping a variant. Each command registers its own
arguments; heavy modules are imported inside the commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["cmd_export", "cmd_pick", "cmd_variants", "register"]


def _slo_from_args(args: argparse.Namespace) -> Any:
    from edgeslim.search._pick import SLO
    from edgeslim.spaces import SpecError

    try:
        return SLO(max_latency_ms=args.max_latency_ms, p95=args.p95, max_size_kb=args.max_size_kb,
                   max_energy_mj=args.max_energy_mj, min_accuracy=args.min_accuracy,
                   max_accuracy_drop_pp=args.max_accuracy_drop, max_class_drop_pp=args.max_class_drop)
    except ValueError as e:
        raise SpecError(str(e)) from None


def cmd_pick(args: argparse.Namespace) -> int:
    """Pick the most accurate variant meeting every budget; optionally export it."""
    from edgeslim.search._export import export_variant, open_study_dir
    from edgeslim.search._front import all_records
    from edgeslim.search._pick import NoFitError, select

    slo = _slo_from_args(args)
    study, _ = open_study_dir(Path(args.study), args.storage)
    if study.user_attrs.get("label_free") and slo.max_class_drop_pp is not None:
        from edgeslim.spaces import SpecError

        raise SpecError("--max-class-drop needs labelled data; this study's data is label-free (its classes are "
                        "the dense model's own predictions); drop --max-class-drop or search with labelled data")
    records = all_records(study)
    try:
        best = select(records, slo)
    except NoFitError as e:
        print(f"edgeslim: {e}", file=sys.stderr)
        return 3
    vs = best.get("vs_baseline", {})
    print(f"picked trial {best['trial']} ({best.get('preset') or 'searched'}): accuracy {best['accuracy']:.4f} "
          f"({0.0 - vs.get('accuracy_drop_pp', 0):+.2f} pp, worst class {0.0 - vs.get('max_class_drop_pp', 0):+.2f} pp), "
          f"size {best['size_bytes'] / 1e3:.1f} kB, latency p50 {best['latency_ms']:.4f} / p95 "
          f"{best.get('latency_p95_ms', float('nan')):.4f} ms, energy {best.get('energy_mj', float('nan')):.4f} mJ "
          f"(estimate); plan: {best.get('plan_summary', '')}")
    if args.format == "json":
        print(json.dumps(best, indent=2, default=float))
    _redraw_report(Path(args.study), study, slo, best["trial"])
    if not args.export:
        return 0
    result = export_variant(Path(args.study), best["trial"], Path(args.export), args.storage,
                            args.finetune_steps, slo, Path(args.devices_dir),
                            log=lambda m: print(m, file=sys.stderr))
    return _report_export(result)


def _redraw_report(study_dir: Any, study: Any, slo: Any, picked: int) -> None:
    """Re-draw report.html with the SLO shaded and the pick highlighted (the report is derived data)."""
    from edgeslim.search._front import front_entries
    from edgeslim.search._report import build_report_data, render_report

    names = list(study.metric_names or [])
    from edgeslim.search._budgets import SEARCH_BUDGETS

    budgets = {k: v for k, v in slo.active().items() if k in SEARCH_BUDGETS}
    data = build_report_data(study, names, front_entries(study, names), budgets,
                             f"edgeslim study {study.study_name}: pick under {slo.active()}", picked)
    path = render_report(data, study_dir / "report.html")
    print(f"report: {path} (SLO shaded, pick highlighted)")


def _report_export(result: Any) -> int:
    a, s = result.card["artifact"], result.card["search"]
    print(f"exported {result.version} to {result.folder}: {a['bytes']} bytes, accuracy {a['accuracy']:.4f} "
          f"(search {s.get('accuracy', float('nan')):.4f}, torch/ONNX agreement {a['torch_onnx_top1_agreement']:.4f}), "
          f"latency p50 {a['latency_p50_ms']:.4f} ms (search {s.get('latency_ms', float('nan')):.4f} ms), "
          f"p95 {a['latency_p95_ms']:.4f} ms")
    for flag in result.flags:
        print(f"  FLAG: {flag}")
    return 1 if result.card["slo_misses"] else 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export one trial as a versioned ONNX variant with a model card."""
    from edgeslim.search._export import export_variant

    result = export_variant(Path(args.study), args.trial, Path(args.out) if args.out else None, args.storage,
                            args.finetune_steps, None, Path(args.devices_dir),
                            log=lambda m: print(m, file=sys.stderr))
    return _report_export(result)


def cmd_variants(args: argparse.Namespace) -> int:
    """List a study's exported variants (kept for rollback)."""
    from edgeslim.search._export import list_variants
    from edgeslim.spaces import SpecError

    if not Path(args.study).is_dir():
        raise SpecError(f"study folder {args.study!r} does not exist; pass the folder `edgeslim search` wrote "
                        "(e.g. studies/digits-demo)")
    cards = list_variants(Path(args.study))
    if args.format == "json":
        print(json.dumps(cards, indent=2, default=float))
        return 0
    if not cards:
        print(f"no variants exported in {args.study} yet; run `edgeslim export` or `edgeslim pick --export`")
        return 0
    print(f"{'version':<8} {'trial':>5} {'created':<26} {'accuracy':>8} {'size KB':>8} {'p50 ms':>8} {'p95 ms':>8}  flags")
    for c in cards:
        a = c["artifact"]
        print(f"{c['version']:<8} {c['trial']:>5} {c['created']:<26} {a['accuracy']:>8.4f} {a['bytes'] / 1e3:>8.1f} "
              f"{a['latency_p50_ms']:>8.4f} {a['latency_p95_ms']:>8.4f}  {len(c['flags'])}")
    return 0


def register(sub: Any) -> None:
    """Add ``pick``, ``export`` and ``variants`` to the CLI's subparsers."""
    for name, fn, help_ in (
            ("pick", cmd_pick, "pick the best variant under an SLO (exit 3 with the nearest misses if none fits)"),
            ("export", cmd_export, "export a trial as a versioned ONNX variant with a model card"),
            ("variants", cmd_variants, "list a study's exported variants")):
        p = sub.add_parser(name, help=help_, description=fn.__doc__)
        p.set_defaults(func=fn)
        p.add_argument("study", help="study folder written by `edgeslim search` (e.g. studies/digits-demo)")
        p.add_argument("--format", choices=["table", "json"], default="table")
        if name == "variants":
            continue
        p.add_argument("--storage", help="Optuna storage URL when the study is not in STUDY/study.db")
        p.add_argument("--finetune-steps", type=int, help="fine-tune longer before export (default: as searched)")
        p.add_argument("--devices-dir", default="studies/devices")
        if name == "export":
            p.add_argument("--trial", type=int, required=True)
            p.add_argument("--out", help="also copy the variant here (must be empty)")
            continue
        p.add_argument("--export", metavar="DIR", help="export the pick (also kept in STUDY/variants/vN)")
        p.add_argument("--max-latency-ms", type=float)
        p.add_argument("--p95", action="store_true", help="apply --max-latency-ms to p95, not p50")
        p.add_argument("--max-size-kb", type=float)
        p.add_argument("--max-energy-mj", type=float)
        acc = p.add_mutually_exclusive_group()
        acc.add_argument("--min-accuracy", type=float)
        acc.add_argument("--max-accuracy-drop", type=float, help="percentage points below the dense baseline")
        p.add_argument("--max-class-drop", type=float, help="largest per-class drop allowed (pp)")

"""Benchmark: search, pick the fastest variant within 1 pp of the dense baseline, export it and the
dense baseline as ONNX, and measure both artifacts side by side in this run.

Usage: python studies/bench_deploy.py [--trials N] [--device NAME] [--torchvision NAME] [--tv-finetune-steps N]
Workloads: the built-in digits-resnet (>= 1 ms) and a torchvision network (resnet18 unless
--torchvision names another) trained from scratch on digits at 3x32x32.
With --device, the search predicts latency with that profile and the gap to the measured
artifact is the profile's error; without it, the gap is search-time vs export-time measurement.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--device", default="local")
    parser.add_argument("--max-drop-pp", type=float, default=1.0)
    parser.add_argument("--torchvision", default="resnet18", help="torchvision classification network")
    parser.add_argument("--tv-finetune-steps", type=int, default=150,
                        help="fine-tune steps per trial for the torchvision network")
    parser.add_argument("--only", choices=["builtin", "torchvision"], help="run one of the two rows")
    args = parser.parse_args()

    import onnxruntime

    from edgeslim.objectives import measure_latency
    from edgeslim.search import demo_spec, load_spec, run_search
    from edgeslim.search._export import all_records, export_variant
    from edgeslim.search._pick import SLO, NoFitError, select
    from edgeslim.search._spec import DataSpec, DeviceSpec, FinetuneSpec, ModelSpec, RuleSpec, SpaceSpec

    here = Path(__file__).parent
    tv_label = f"{args.torchvision} (torchvision, 3x32x32)"
    specs = {
        "digits-resnet": load_spec(here / "digits-resnet.toml"),
        tv_label: demo_spec().replace(
            name=f"digits-{args.torchvision}",
            model=ModelSpec(torchvision=args.torchvision, num_classes=10, input_shape=[3, 32, 32], train_epochs=15),
            data=DataSpec(factory="edgeslim.search._workloads:digits_rgb32"),
            finetune=FinetuneSpec(steps=args.tv_finetune_steps, lr=2e-3, batch_size=32),
            # a deep network from scratch: moderate sparsity, rank only halved, int8 or fp32
            space=SpaceSpec(rules={"_default": RuleSpec(sparsity=[0.0, 0.25, 0.5], rank=[0.5, 1.0],
                                                        bits=[8, 32])})),
    }
    if args.only:
        specs = {k: v for k, v in specs.items() if (k == tv_label) == (args.only == "torchvision")}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}, "
          f"device {args.device}")
    rows = []
    for label, spec in specs.items():
        out = Path(tempfile.mkdtemp(prefix="edgeslim-deploy-"))
        spec = spec.replace(out_dir=str(out), trials=args.trials, device=DeviceSpec(name=args.device))
        result = run_search(spec, devices_dir=Path("studies/devices"))
        records = all_records(result.study)
        try:
            best = select([r for r in records if r.get("preset") != "dense"] or records,
                          SLO(max_accuracy_drop_pp=args.max_drop_pp))
        except NoFitError as e:
            print(f"{label}: {e}")
            continue
        pick = min((r for r in records if r["vs_baseline"].get("accuracy_drop_pp", 1e9) <= args.max_drop_pp
                    and r.get("preset") != "dense"), key=lambda r: r["latency_ms"], default=best)
        dense = export_variant(out, 0, log=lambda m: None)
        variant = export_variant(out, pick["trial"], log=lambda m: None)
        shape = tuple(result.workload.example_input.shape)
        d_lat = measure_latency(dense.folder / "model.onnx", shape, budget_s=2.0)
        v_lat = measure_latency(variant.folder / "model.onnx", shape, budget_s=2.0)
        va, da = variant.card["artifact"], dense.card["artifact"]
        rows.append((label, pick["trial"], da["accuracy"], va["accuracy"], d_lat.p50_ms, v_lat.p50_ms,
                     da["bytes"], va["bytes"], pick["latency_ms"], pick.get("latency_method", ""), pick["plan_summary"]))
    print("\n| workload | trial | dense acc | variant acc | dense p50 ms | variant p50 ms | speedup | dense KB | "
          "variant KB | size reduction | search latency ms | gap vs artifact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (label, trial, dacc, vacc, dl, vl, db, vb, sl, method, plan) in rows:
        print(f"| {label} | {trial} | {dacc:.4f} | {vacc:.4f} | {dl:.3f} | {vl:.3f} | {dl / vl:.2f}x | {db / 1e3:.1f} | "
              f"{vb / 1e3:.1f} | {db / vb:.2f}x | {sl:.3f} ({method.split(':')[0]}) | {sl / vl - 1:+.1%} |")
        print(f"|   plan: {plan} |")


if __name__ == "__main__":
    main()

"""Benchmark: search, pick the fastest variant within 1 pp of the dense baseline, export it and the
dense baseline as ONNX, and measure both artifacts side by side in this run.

Usage: python studies/bench_deploy.py [--trials N] [--device NAME]
Workloads: the built-in digits-resnet (>= 1 ms) and torchvision mobilenet_v2 on digits at 3x32x32.
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
    args = parser.parse_args()

    import onnxruntime

    from edgeslim.objectives import measure_latency
    from edgeslim.search import demo_spec, load_spec, run_search
    from edgeslim.search._export import all_records, export_variant
    from edgeslim.search._pick import SLO, NoFitError, select
    from edgeslim.search._spec import DataSpec, DeviceSpec, FinetuneSpec, ModelSpec

    here = Path(__file__).parent
    specs = {
        "digits-resnet": load_spec(here / "digits-resnet.toml"),
        "mobilenet_v2 (torchvision, 3x32x32)": demo_spec().replace(
            name="digits-mobilenet-v2",
            model=ModelSpec(torchvision="mobilenet_v2", num_classes=10, input_shape=[3, 32, 32], train_epochs=15),
            data=DataSpec(factory="edgeslim.search._workloads:digits_rgb32"),
            finetune=FinetuneSpec(steps=40, lr=2e-3, batch_size=32), space=load_spec(here / "digits-resnet.toml").space),
    }
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}, "
          f"device {args.device}")
    rows = []
    for label, spec in specs.items():
        if label.startswith("mobilenet"):
            spec = spec.replace(space=type(spec.space)(rules={k: v for k, v in spec.space.rules.items()
                                                              if k == "_default"}))
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

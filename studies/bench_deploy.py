"""Benchmark: search, refine the front, pick the fastest variant within 1 pp of the dense baseline,
export it and the dense baseline as ONNX, and time both artifacts side by side (paired) in this run.

Usage: python studies/bench_deploy.py [--trials N] [--device NAME] [--torchvision NAME] [--tv-finetune-steps N]
Workloads: the built-in digits-resnet (>= 1 ms), a torchvision network (resnet18 unless
--torchvision names another) trained from scratch on digits at 3x32x32, and the pretrained
EfficientNet-Lite0 (studies/efficientnet-lite0.toml, label-free).
With --device, the search predicts latency with that profile and the gap to the measured
artifact is the profile's error; without it, the gap is search-time vs export-time measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    parser.add_argument("--only", choices=["builtin", "torchvision", "pretrained"], help="run one of the rows")
    parser.add_argument("--refine-steps", type=int, help="refine steps (default 10x the search's)")
    parser.add_argument("--tv-sparsity", default="0,0.25,0.5",
                        help="sparsity choices of the torchvision network's space, comma-separated")
    parser.add_argument("--channel-multiple", type=int, default=1,
                        help="[space] channel_multiple for both rows (0: the device's channel block)")
    args = parser.parse_args()

    import time

    import onnxruntime

    from edgeslim.objectives import measure_latency
    from edgeslim.search import (SLO, NoFitError, all_records, demo_spec, export_variant, load_spec, refine_study,
                                 run_search, select)
    from edgeslim.objectives.devices import device_facts
    from edgeslim.search import DataSpec, DeviceSpec, FinetuneSpec, ModelSpec, RuleSpec, SpaceSpec

    here = Path(__file__).parent
    tv_label = f"{args.torchvision} (torchvision, 3x32x32)"
    specs = {
        "digits-resnet": load_spec(here / "digits-resnet.toml"),
        tv_label: demo_spec().replace(
            name=f"digits-{args.torchvision}",
            model=ModelSpec(torchvision=args.torchvision, num_classes=10, input_shape=[3, 32, 32], train_epochs=15),
            data=DataSpec(factory="edgeslim.search:digits_rgb32"),
            finetune=FinetuneSpec(steps=args.tv_finetune_steps, lr=2e-3, batch_size=32),
            # a deep network from scratch: moderate sparsity, rank only halved, int8 or fp32
            space=SpaceSpec(rules={"_default": RuleSpec(sparsity=[float(v) for v in args.tv_sparsity.split(",")],
                                                        rank=[0.5, 1.0], bits=[8, 32])})),
    }
    # the pretrained row: EfficientNet-Lite0 with its ImageNet weights, label-free (see its spec)
    pretrained_label = "efficientnet-lite0 (pretrained, 160x160)"
    specs[pretrained_label] = load_spec(here / "efficientnet-lite0.toml")
    if args.only:
        row = {"builtin": "digits-resnet", "torchvision": tv_label, "pretrained": pretrained_label}[args.only]
        specs = {row: specs[row]}
    facts = device_facts(1)
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in facts.get("isa_flags", [])]
    print(f"machine: {facts.get('cpu_model', platform.processor())} ({platform.machine()}, {os.cpu_count()} cores, "
          f"{' '.join(isa)}), onnxruntime {onnxruntime.__version__}, device {args.device}")
    rows = []
    for label, spec in specs.items():
        out = Path(tempfile.mkdtemp(prefix="edgeslim-deploy-"))
        spec = spec.replace(out_dir=str(out), trials=args.trials, device=DeviceSpec(name=args.device),
                            space=dataclasses.replace(spec.space, channel_multiple=args.channel_multiple))
        t0 = time.perf_counter()
        result = run_search(spec, devices_dir=Path("studies/devices"))
        search_s = time.perf_counter() - t0
        refined = refine_study(out, steps=args.refine_steps, log=lambda m: None)
        records = all_records(result.study)  # refined figures where the refine stage scored the trial
        try:
            best = select([r for r in records if r.get("preset") != "dense"] or records,
                          SLO(max_accuracy_drop_pp=args.max_drop_pp))
        except NoFitError as e:
            print(f"{label}: {e}")
            continue
        pick = min((r for r in records if r["vs_baseline"].get("accuracy_drop_pp", 1e9) <= args.max_drop_pp
                    and r.get("preset") != "dense"), key=lambda r: r["latency_ms"], default=best)
        dense = export_variant(out, 0, log=lambda m: None)
        steps = refined.steps if pick.get("refined") else None
        variant = export_variant(out, pick["trial"], finetune_steps=steps, log=lambda m: None)
        shape = tuple(result.workload.example_input.shape)
        paired = measure_latency(variant.folder / "model.onnx", shape, budget_s=4.0,
                                 reference=dense.folder / "model.onnx")
        va, da = variant.card["artifact"], dense.card["artifact"]
        rows.append((label, pick["trial"], da["accuracy"], va["accuracy"], paired.reference_p50_ms, paired.p50_ms,
                     paired.speedup, paired.speedup_spread, da["bytes"], va["bytes"], search_s, refined.seconds,
                     len(refined.trials), pick["plan_summary"], "refined" if pick.get("refined") else "search"))
    print("\n| workload | trial | dense acc | variant acc | dense p50 ms | variant p50 ms | speedup (pair range) | "
          "dense KB | variant KB | size reduction | search s | refine s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (label, trial, dacc, vacc, dl, vl, sp, spread, db, vb, ss, rs, nref, plan, source) in rows:
        print(f"| {label} | {trial} ({source}) | {dacc:.4f} | {vacc:.4f} | {dl:.3f} | {vl:.3f} | "
              f"{sp:.2f}x ({spread[0]:.2f}-{spread[1]:.2f}) | {db / 1e3:.1f} | {vb / 1e3:.1f} | {db / vb:.2f}x | "
              f"{ss:.0f} | {rs:.0f} ({nref} trials) |")
        print(f"|   plan: {plan} |")


if __name__ == "__main__":
    main()

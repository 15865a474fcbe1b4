"""Benchmark: run a study from scratch and print wall time, seconds per trial and the best
variant within 1 percentage point of the dense baseline's accuracy.

Usage: python studies/bench_demo.py [--workload digits-cnn|digits-resnet] [--trials N]
Latency speedup and size reduction are measured side by side in this one run: the dense
baseline is trial 0 of the same study, exported and timed with the same protocol.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="digits-cnn", choices=["digits-cnn", "digits-resnet"])
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--max-drop-pp", type=float, default=1.0)
    args = parser.parse_args()

    import onnxruntime
    import torch

    from edgeslim.search import demo_spec, load_spec, run_search

    spec = demo_spec() if args.workload == "digits-cnn" else load_spec(
        Path(__file__).with_name("digits-resnet.toml"))
    out = Path(tempfile.mkdtemp(prefix="edgeslim-bench-"))
    spec = spec.replace(out_dir=str(out), **({"trials": args.trials} if args.trials else {}))
    t0 = time.perf_counter()
    result = run_search(spec)
    wall = time.perf_counter() - t0
    trials = [t for t in result.study.trials if t.user_attrs.get("seconds") is not None]
    per_trial = sum(t.user_attrs["seconds"] for t in trials) / max(len(trials), 1)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    print(f"workload: {args.workload}, {len(trials)} trials, sampler {spec.sampler}")
    print(f"wall time: {wall:.1f} s (base model training and report included)")
    print(f"seconds per trial: {per_trial:.2f} (fine-tune + export + quantize + latency)")
    base = result.front[0]["baseline"] if result.front else {}
    print(f"dense baseline: accuracy {base.get('accuracy', float('nan')):.4f}, size "
          f"{base.get('size_bytes', float('nan')) / 1e3:.1f} kB, latency p50 "
          f"{base.get('latency_ms', float('nan')):.4f} ms")
    ok = [e for e in result.front if e["vs_baseline"].get("accuracy_drop_pp", 1e9) <= args.max_drop_pp]
    if not ok:
        print(f"no Pareto variant within {args.max_drop_pp} pp of the baseline's accuracy")
        return
    fastest = min(ok, key=lambda e: e["latency_ms"])
    smallest = min(ok, key=lambda e: e["size_bytes"])
    for label, e in (("fastest", fastest), ("smallest", smallest)):
        vs = e["vs_baseline"]
        print(f"{label} variant within {args.max_drop_pp} pp: trial {e['trial']} ({e['preset'] or 'searched'}), "
              f"accuracy {e['accuracy']:.4f} ({-vs['accuracy_drop_pp']:+.2f} pp), latency "
              f"{e['latency_ms']:.4f} ms = {vs['latency_speedup']:.2f}x speedup, size "
              f"{e['size_bytes'] / 1e3:.1f} kB = {vs['size_reduction']:.2f}x smaller; plan: {e['plan_summary']}")
    print(f"report: {result.report_path}")


if __name__ == "__main__":
    main()

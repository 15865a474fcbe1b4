"""Benchmark: time to predict one candidate's latency with a calibrated device profile.

Usage: python studies/bench_predict.py --device NAME [--repeats 200]
Kernel lists are extracted once per network (that is done on the realized candidate anyway);
the figure is the model's predict() time, with the per-kernel cache cleared (cold) and warm.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", required=True)
    parser.add_argument("--devices-dir", default="studies/devices")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    import torch

    from edgeslim.objectives import load_device
    from edgeslim.objectives.devices import extract_graph, io_bytes
    from edgeslim.search import VALIDATION_WORKLOADS

    profile = load_device(args.device, devices_dir=Path(args.devices_dir))
    model = profile.latency_model
    print(f"device {profile.name} ({profile.profile_id})")
    for name, (factory, shape) in VALIDATION_WORKLOADS.items():
        net = factory().eval()
        x = torch.randn(shape)
        kernels, edges = extract_graph(net, x)
        io = io_bytes(kernels, x)
        cold = []
        for _ in range(args.repeats):
            model._cache.clear()
            t0 = time.perf_counter()
            model.predict(kernels, io, edges)
            cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            model.predict(kernels, io, edges)
        warm = (time.perf_counter() - t0) / args.repeats
        cold.sort()
        print(f"{name:<18} {len(kernels):>3} kernels  predict cold median {cold[len(cold) // 2] * 1e3:.3f} ms  "
              f"warm {warm * 1e3:.3f} ms")


if __name__ == "__main__":
    main()

"""Measurement protocol for calibration micro-models; needs only Python, numpy and onnxruntime.

This file is copied verbatim into calibration kits as ``run_kit.py`` so a remote device runs
exactly the protocol a local ``edgeslim calibrate`` runs. Keep it free of edgeslim and torch
imports.

Kit usage on the device:  python run_kit.py KIT_DIR [--threads N] [--out measurements.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

KIT_VERSION = 1
PROTOCOL = {"warmup": 10, "min_runs": 15, "max_runs": 400, "budget_s": 0.12, "spike_factor": 10.0}


def device_facts(threads: int) -> dict[str, Any]:
    """CPU model, cores, ISA flags relevant to int8 (VNNI / dot-product), OS, onnxruntime, threads."""
    import onnxruntime as ort

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and model in ("", platform.machine()):
                    model = value.strip()
                elif key in ("flags", "features"):
                    flags.update(value.split())
    except OSError:
        pass
    wanted = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma", "sse4_2", "asimd", "asimddp",
              "i8mm", "sve", "neon"}
    return {
        "cpu_model": model,
        "cores": os.cpu_count() or 1,
        "isa_flags": sorted(flags & wanted),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "threads": threads,
    }


def make_session(path: str, threads: int) -> Any:
    """An ONNX Runtime CPU session with fixed intra-op threads and sequential execution."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def random_feed(session: Any, seed: int) -> dict[str, np.ndarray]:
    """Random normal inputs for every graph input (never zeros: some kernels skip zero work)."""
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
            for i in session.get_inputs()}


def time_session(session: Any, feed: dict[str, np.ndarray], protocol: dict[str, float] | None = None,
                 energy_reader: Any = None) -> dict[str, Any]:
    """Warm up, then time single runs until the budget is spent; median, p95, spikes dropped.

    Runs slower than ``spike_factor`` x the median (a preempted VM, a page fault storm) are
    dropped before the p95 is taken and counted in ``rejected``.
    """
    p = {**PROTOCOL, **(protocol or {})}
    for _ in range(int(p["warmup"])):
        session.run(None, feed)
    times: list[float] = []
    e0 = energy_reader() if energy_reader else None
    start = time.perf_counter()
    while len(times) < p["max_runs"] and (len(times) < p["min_runs"] or time.perf_counter() - start < p["budget_s"]):
        t0 = time.perf_counter_ns()
        session.run(None, feed)
        times.append((time.perf_counter_ns() - t0) / 1e6)
    wall = time.perf_counter() - start
    e1 = energy_reader() if energy_reader else None
    arr = np.asarray(times)
    med = float(np.median(arr))
    kept = arr[arr <= p["spike_factor"] * med]
    out = {"p50_ms": med, "p95_ms": float(np.percentile(kept, 95)), "runs": int(len(arr)),
           "rejected": int(len(arr) - len(kept))}
    if e0 is not None and e1 is not None:
        out["energy_mj"] = (e1 - e0) / len(arr) * 1e3  # joules -> mJ per inference
        out["wall_s"] = wall
    return out


def measure_file(path: str, threads: int, seed: int, protocol: dict[str, float] | None = None,
                 energy_reader: Any = None) -> dict[str, Any]:
    """End-to-end timing of one ONNX file with random inputs, and its input+output bytes."""
    session = make_session(path, threads)
    feed = random_feed(session, seed)
    out = time_session(session, feed, protocol, energy_reader)
    out["io_bytes"] = int(sum(v.nbytes for v in feed.values()) + sum(
        int(np.prod([d if isinstance(d, int) else 1 for d in o.shape])) * 4 for o in session.get_outputs()))
    return out


def run_models(paths: list[str], threads: int, protocol: dict[str, float] | None = None,
               energy_reader: Any = None, progress: Any = None) -> list[dict[str, Any]]:
    """Measure each ONNX file in turn; ``progress(done, total)`` is called after each."""
    results = []
    for i, path in enumerate(paths):
        results.append(measure_file(path, threads, i, protocol, energy_reader))
        if progress:
            progress(i + 1, len(paths))
    return results


def _kit_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run an edgeslim calibration kit on this device.")
    parser.add_argument("kit", nargs="?", default=str(Path(__file__).parent))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="measurements.json")
    args = parser.parse_args(argv)
    kit = Path(args.kit)
    manifest = json.loads((kit / "kit.json").read_text())
    threads = args.threads or manifest["threads"]
    if threads > (os.cpu_count() or 1):
        print(f"error: --threads {threads} exceeds this device's {os.cpu_count()} cores", file=sys.stderr)
        return 2
    paths = [str(kit / e["file"]) for e in manifest["entries"]]
    t0 = time.time()

    def progress(done: int, total: int) -> None:
        eta = (time.time() - t0) / done * (total - done)
        print(f"\r{done}/{total} micro-models  ETA {eta:.0f}s", end="", file=sys.stderr, flush=True)

    results = run_models(paths, threads, manifest.get("protocol"), progress=progress)
    print(file=sys.stderr)
    out = {"kit_version": manifest["kit_version"], "kit_id": manifest["kit_id"], "facts": device_facts(threads),
           "protocol": {**PROTOCOL, **manifest.get("protocol", {})},
           "entries": [{**e, **r} for e, r in zip(manifest["entries"], results)],
           **({"focus": manifest["focus"]} if "focus" in manifest else {})}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}; copy it back and run: edgeslim calibrate --fit {args.out} --device NAME")
    return 0


if __name__ == "__main__":
    sys.exit(_kit_main())

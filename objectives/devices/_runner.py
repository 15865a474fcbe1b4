"""Measurement protocol for calibration micro-models; needs only Python, numpy and onnxruntime.

This file is copied verbatim into calibration kits as ``run_kit.py`` so a remote device runs
exactly the protocol a local ``edgeslim calibrate`` runs. Keep it free of edgeslim and torch
imports.

Kit usage on the device:  python run_kit.py KIT_DIR [--threads N] [--out measurements.json]
(a calibration kit from ``edgeslim calibrate --kit``, or a check kit from ``edgeslim check-latency --kit``)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

KIT_VERSION = 1
# ``rounds``: windows each model is timed in, taking turns with the models measured with it
PROTOCOL = {"warmup": 10, "min_runs": 15, "max_runs": 400, "budget_s": 0.12, "spike_factor": 10.0, "rounds": 6}


# a stretch of a run during which the device ran this much slower or faster than its median
# state (a board throttling, a VM's neighbour busy) is measured again once the device is back
EXCURSION = 0.15
# how long to wait for the device to come back, and the pause between two looks
WAIT = {"limit_s": 90.0, "pause_s": 15.0}


def speed_factors(times: Sequence[Sequence[float]]) -> np.ndarray:
    """Per timing of the reference kernels (rows of ``times``): the device's relative slowness,
    1.0 = the run's median state. Geometric mean over the kernels of time / that kernel's
    median, then the median of each timing and its two neighbours, so one noisy timing does
    not move the measurements around it.

    Example:
        >>> speed_factors([[1.0, 2.0], [1.0, 2.0], [1.5, 3.0], [1.5, 3.0], [1.0, 2.0]]).round(2).tolist()
        [1.0, 1.0, 1.5, 1.5, 1.0]
    """
    arr = np.asarray(times, dtype=float)
    raw = np.exp(np.log(arr / np.median(arr, axis=0)).mean(axis=1))
    padded = np.concatenate([raw[:1], raw, raw[-1:]])
    return np.median(np.stack([padded[:-2], padded[1:-1], padded[2:]]), axis=0)


def speed_ratio(now: Sequence[float], then: Sequence[float]) -> float:
    """Geometric mean of now/then over the reference kernels: 1.1 means 10 % slower now.

    Example:
        >>> round(speed_ratio([1.1, 2.2], [1.0, 2.0]), 3)
        1.1
    """
    return float(np.exp(np.mean(np.log(np.asarray(now) / np.asarray(then)))))


def reference_timings(entries: Sequence[Mapping[str, Any]]) -> list[tuple[int, dict[int, int]]]:
    """The timings of the reference kernels in a kit's entries: each run of consecutive entries
    with ``reference`` is one timing, positioned at the entry after it, as (position,
    {reference index: entry index}).

    Example:
        >>> reference_timings([{"reference": 0}, {"reference": 1}, {}, {"reference": 0}])
        [(2, {0: 0, 1: 1}), (4, {0: 3})]
    """
    timings: list[tuple[int, dict[int, int]]] = []
    run: dict[int, int] = {}
    for i, e in enumerate([*entries, {}]):
        if "reference" in e:
            run[int(e["reference"])] = i
        elif run:
            timings.append((i, run))
            run = {}
    return timings


def group_spans(keys: Sequence[Any]) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive equal keys (a kit's groups, timed together).

    Example:
        >>> group_spans(["a", "a", "b", "a"])
        [(0, 2), (2, 3), (3, 4)]
    """
    spans, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            spans.append((start, i))
            start = i
    return spans


def away(factor: float) -> bool:
    """Whether a speed factor lies outside the usual state (by more than ``EXCURSION``)."""
    return abs(float(np.log(factor))) > float(np.log1p(EXCURSION))


def nearer_usual(new: float, old: float) -> bool:
    """The one rule for keeping a measurement taken again (calibration and kits alike): keep it
    when the device's speed factor at its moment lies nearer the usual state (1.0) than the
    factor at the first measurement's moment.

    Example:
        >>> nearer_usual(1.05, 1.4), nearer_usual(1.5, 1.4)
        (True, False)
    """
    return abs(float(np.log(new))) < abs(float(np.log(old)))


def wait_until_usual(probe: Callable[[], Sequence[float]], usual: Sequence[float],
                     limit_s: float | None = None, pause_s: float | None = None,
                     sleep: Callable[[float], None] = time.sleep,
                     say: Callable[[str], None] | None = None) -> tuple[bool, float, float]:
    """Time the reference kernels (``probe``) until they run within ``EXCURSION`` of ``usual``,
    pausing between looks (a board cools down, a neighbour's job ends), for at most ``limit_s``
    of pauses. Returns (back, the last look's speed factor, seconds waited).

    Example:
        >>> looks = iter([[1.5], [1.3], [1.02]])
        >>> wait_until_usual(lambda: next(looks), [1.0], sleep=lambda s: None)
        (True, 1.02, 30.0)
    """
    limit = WAIT["limit_s"] if limit_s is None else limit_s
    pause = WAIT["pause_s"] if pause_s is None else pause_s
    waited = 0.0
    while True:
        factor = speed_ratio(probe(), usual)
        if not away(factor) or waited + pause > limit:
            return not away(factor), factor, waited
        if say:
            say(f"the device runs {factor - 1:+.0%} off its usual speed; waiting {pause:.0f} s for it to settle")
        sleep(pause)
        waited += pause


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


def time_group(sessions: Sequence[Any], feeds: Sequence[dict[str, np.ndarray]],
               protocol: dict[str, float] | None = None, energy_reader: Any = None,
               keep_times: bool = False) -> list[dict[str, Any]]:
    """Time several sessions in turn, each in ``rounds`` short windows that take turns with the
    others' (round robin), so every model is sampled across the same stretch of time.

    A shared VM switches between speed states every 50-500 ms (sub-0.1 ms models run 15 %
    slower or faster for a while): one contiguous 0.12 s window lands in one state and its
    model's time with it, while a kernel's saving inside a chain is a few microseconds between
    models timed apart. Interleaved windows put the chain and its lone kernels in the same
    states (measured effect in studies/BENCHMARKS.md). Each window first runs the model once (its caches were the others' meanwhile);
    the first also does the warm-up. Runs slower than ``spike_factor`` x the median (a
    preempted VM, a page-fault storm) are dropped before the p95 and counted in ``rejected``.
    With ``keep_times`` each result also lists every run's time (``times_ms``).

    Example:
        >>> time_group([sess_a, sess_b], [feed_a, feed_b])[0]["p50_ms"]  # doctest: +SKIP
        0.031
    """
    p = {**PROTOCOL, **(protocol or {})}
    rounds = max(min(int(p.get("rounds", 1)), int(p["max_runs"])), 1)
    window = float(p["budget_s"]) / rounds
    times: list[list[float]] = [[] for _ in sessions]
    energy = [0.0] * len(sessions)
    metered = [energy_reader is not None] * len(sessions)  # a reading in every window
    wall = [0.0] * len(sessions)
    for r in range(rounds):
        for i, (session, feed) in enumerate(zip(sessions, feeds)):
            for _ in range(int(p["warmup"]) if r == 0 else 1):
                session.run(None, feed)
            these = times[i]
            n0, left = len(these), rounds - r
            # the runs still owed, spread over the windows left: never more than max_runs in all
            most = -(-(int(p["max_runs"]) - n0) // left)
            least = min(max(-(-(int(p["min_runs"]) - n0) // left), 0), most)
            e0 = energy_reader() if energy_reader else None
            start = time.perf_counter()
            while len(these) - n0 < most and (len(these) - n0 < least or time.perf_counter() - start < window):
                t0 = time.perf_counter_ns()
                session.run(None, feed)
                these.append((time.perf_counter_ns() - t0) / 1e6)
            wall[i] += time.perf_counter() - start
            e1 = energy_reader() if energy_reader else None
            if e0 is not None and e1 is not None:
                energy[i] += e1 - e0
            else:
                metered[i] = False
    out = []
    for i, these in enumerate(times):
        arr = np.asarray(these)
        med = float(np.median(arr))
        kept = arr[arr <= p["spike_factor"] * med]
        # never below the median: with few runs, dropping a spike can pull the kept runs' p95 under it
        res: dict[str, Any] = {"p50_ms": med, "p95_ms": max(med, float(np.percentile(kept, 95))), "runs": int(len(arr)),
                               "rejected": int(len(arr) - len(kept))}
        if keep_times:
            res["times_ms"] = these
        if metered[i]:
            res["energy_mj"] = energy[i] / len(arr) * 1e3  # joules -> mJ per inference
            res["wall_s"] = wall[i]
        out.append(res)
    return out


def _io_bytes(session: Any, feed: dict[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in feed.values()) + sum(
        int(np.prod([d if isinstance(d, int) else 1 for d in o.shape])) * 4 for o in session.get_outputs()))


def measure_file(path: str, threads: int, seed: int, protocol: dict[str, float] | None = None,
                 energy_reader: Any = None) -> dict[str, Any]:
    """End-to-end timing of one ONNX file with random inputs, and its input+output bytes."""
    return measure_files([path], threads, [seed], protocol, energy_reader)[0]


def measure_files(paths: Sequence[str], threads: int, seeds: Sequence[int], protocol: dict[str, float] | None = None,
                  energy_reader: Any = None, keep_times: bool = False,
                  open_session: Callable[[str, int], Any] | None = None,
                  feed: Callable[[Any, int], dict[str, np.ndarray]] | None = None) -> list[dict[str, Any]]:
    """Time ONNX files together (:func:`time_group`); each result also has its file's
    input+output bytes. Sessions come from ``open_session(path, threads)`` (default
    :func:`make_session`), inputs from ``feed(session, seed)`` (default :func:`random_feed`).

    With more than one thread each file is timed alone, its session closed before the next
    opens: every session owns an intra-op thread pool, and idle pools of live sessions slow the
    running one down (on the 2-core development VM a 64x28x28 conv ran 1,600 us with seven
    other 2-thread sessions open against 800 us alone; with 1 thread there are no pools)."""
    opener = open_session or make_session
    feed_of = feed or random_feed
    if threads > 1 and len(paths) > 1:
        return [m for path, seed in zip(paths, seeds)
                for m in measure_files([path], threads, [seed], protocol, energy_reader, keep_times, opener, feed_of)]
    sessions = [opener(path, threads) for path in paths]
    feeds = [feed_of(s, seed) for s, seed in zip(sessions, seeds)]
    out = time_group(sessions, feeds, protocol, energy_reader, keep_times)
    for res, s, f in zip(out, sessions, feeds):
        res["io_bytes"] = _io_bytes(s, f)
    return out


def pool_sessions(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One model timed in several fresh sessions (results of :func:`measure_files` with
    ``keep_times``): the median of the sessions' medians and the p95 over every run. On a shared
    VM one session of a small model can sit 10-20 % off another (buffer placement), which one
    long session cannot average out.

    Example:
        >>> r = pool_sessions([{"p50_ms": 1.0, "times_ms": [1.0] * 19 + [3.0], "io_bytes": 8},
        ...                    {"p50_ms": 2.0, "times_ms": [2.0] * 20, "io_bytes": 8}])
        >>> r["p50_ms"], r["p95_ms"], r["runs"], r["sessions"]
        (1.5, 2.0, 40, 2)
    """
    arr = np.concatenate([np.asarray(r["times_ms"], dtype=float) for r in results])
    return {"p50_ms": float(np.median([r["p50_ms"] for r in results])), "p95_ms": float(np.percentile(arr, 95)),
            "mean_ms": float(arr.mean()), "runs": int(len(arr)), "rejected": 0,
            "io_bytes": results[0].get("io_bytes", 0), "sessions": len(results)}


def run_check(entries: Sequence[Mapping[str, Any]], paths: Sequence[str], threads: int,
              protocol: dict[str, float] | None, check_protocol: dict[str, float],
              progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Time a check kit (written by ``edgeslim check-latency --kit``) as check-latency times
    candidates on the workstation: each candidate entry alone, in ``sessions`` fresh sessions
    pooled by :func:`pool_sessions` under ``check_protocol``; the reference kernels between them
    under the calibration ``protocol``. No stretch is measured again: a check records the device
    as it ran, and the reference timings around each candidate tell its drift apart.

    Example:
        >>> m = json.loads(Path("check-kit/kit.json").read_text())  # doctest: +SKIP
        >>> run_check(m["entries"], [f"check-kit/{e['file']}" for e in m["entries"]], 1,
        ...           m["protocol"], m["check_protocol"])[0]["p50_ms"]  # doctest: +SKIP
        1.52
    """
    results: list[dict[str, Any]] = []
    for a, b in group_spans([e.get("group", i) for i, e in enumerate(entries)]):
        if "candidate" in entries[a]:
            if b != a + 1:
                raise ValueError(f"check kit entry {a}: a candidate is timed alone, not in a group of {b - a}")
            n = max(int(entries[a].get("sessions", 1)), 1)
            got = measure_files([paths[a]] * n, threads, list(range(n)), check_protocol, keep_times=True)
            results.append(pool_sessions(got))
        else:
            results += measure_files(list(paths[a:b]), threads, list(range(a, b)), protocol)
        if progress:
            progress(b, len(paths))
    return results


def run_models(paths: list[str], threads: int, protocol: dict[str, float] | None = None,
               energy_reader: Any = None, progress: Any = None, groups: Sequence[Any] | None = None
               ) -> list[dict[str, Any]]:
    """Measure ONNX files, consecutive ones with equal ``groups`` entries together (each alone
    without ``groups``); ``progress(done, total)`` is called after each group."""
    keys = list(groups) if groups is not None else list(range(len(paths)))
    results: list[dict[str, Any]] = []
    for i, j in group_spans(keys):
        results += measure_files(paths[i:j], threads, list(range(i, j)), protocol, energy_reader)
        if progress:
            progress(j, len(paths))
    return results


def remeasure_excursions(entries: Sequence[dict[str, Any]], results: list[dict[str, Any]], paths: Sequence[str],
                         threads: int, protocol: dict[str, float] | None = None,
                         say: Callable[[str], None] | None = None,
                         sleep: Callable[[float], None] = time.sleep) -> dict[str, Any] | None:
    """Measure again the groups of a kit run that were timed while the device ran more than
    ``EXCURSION`` off its usual speed, once it is back (:func:`wait_until_usual`).

    Entries with ``reference`` time the reference kernels: each run of them is one timing,
    placed at the entry after it, and their median state is the usual one. A group whose
    position's (interpolated) speed factor is off is timed again after the wait, and its new
    results replace the old ones (``remeasured`` True, the first p50 kept as ``first_p50_ms``)
    when the reference kernels around the new timing were nearer the usual state. Returns what
    was done (None when the whole run stayed within ``EXCURSION`` or had under three timings).
    """
    timings = [(pos, [run[r] for r in sorted(run)]) for pos, run in reference_timings(entries)]
    if len(timings) < 3:
        return None
    times = [[float(results[j]["p50_ms"]) for j in idx] for _, idx in timings]
    factors = speed_factors(times)
    positions = [float(pos) for pos, _ in timings]
    off: list[tuple[int, int, float]] = []
    for a, b in group_spans([e.get("group", i) for i, e in enumerate(entries)]):
        f = float(np.interp(a, positions, factors))
        if not any("reference" in entries[j] for j in range(a, b)) and away(f):
            off.append((a, b, f))
    if not off:
        return None
    ref = timings[0][1]

    def probe() -> list[float]:
        return [m["p50_ms"] for m in measure_files([paths[j] for j in ref], threads, ref, protocol)]

    usual = np.median(np.asarray(times), axis=0).tolist()
    n = sum(b - a for a, b, _ in off)
    back, now, waited = wait_until_usual(probe, usual, say=say, sleep=sleep)
    summary: dict[str, Any] = {"measurements": n, "worst_factor": max(f for _, _, f in off), "back": back,
                               "waited_s": waited, "factor_then": now, "replaced": 0}
    if not back:
        return summary
    fresh = []
    for a, b, _ in off:
        fresh.append(measure_files(list(paths[a:b]), threads, list(range(a, b)), protocol))
        if say and (len(fresh) % 10 == 0 or len(fresh) == len(off)):
            say(f"measured again: {len(fresh)}/{len(off)} groups")
    after = speed_ratio(probe(), usual)
    for k, ((a, b, f), got) in enumerate(zip(off, fresh)):
        # the speed at this group's moment: between the timings before and after, by its place in the run
        at = float(np.exp(np.log(now) + (np.log(after) - np.log(now)) * (k + 0.5) / len(off)))
        if nearer_usual(at, f):
            for j, m in zip(range(a, b), got):
                results[j] = {**m, "remeasured": True, "first_p50_ms": results[j]["p50_ms"]}
            summary["replaced"] += b - a
    summary["factor_after"] = after
    return summary


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
    check = manifest.get("purpose") == "check"

    def progress(done: int, total: int) -> None:
        eta = (time.time() - t0) / done * (total - done)
        print(f"\r{done}/{total} {'models' if check else 'micro-models'}  ETA {eta:.0f}s", end="",
              file=sys.stderr, flush=True)

    if check:
        results = run_check(manifest["entries"], paths, threads, manifest.get("protocol"),
                            manifest["check_protocol"], progress)
        print(file=sys.stderr)
        out = {key: manifest[key] for key in ("kit_version", "kit_id", "purpose", "device", "profile_id",
                                               "candidates", "check_protocol")}
        out.update({"facts": device_facts(threads), "protocol": {**PROTOCOL, **manifest.get("protocol", {})},
                    "entries": [{**e, **r} for e, r in zip(manifest["entries"], results)]})
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}; copy it back and run: edgeslim check-latency --device {manifest['device']} "
              f"--measured {args.out}")
        return 0

    results = run_models(paths, threads, manifest.get("protocol"), progress=progress,
                         groups=[e.get("group", i) for i, e in enumerate(manifest["entries"])])
    print(file=sys.stderr)
    redo = remeasure_excursions(manifest["entries"], results, paths, threads, manifest.get("protocol"),
                                say=lambda text: print(text, file=sys.stderr))
    if redo:
        print(f"{redo['measurements']} micro-models were timed while the device ran up to "
              f"{redo['worst_factor'] - 1:+.0%} off its usual speed: " +
              (f"{redo['replaced']} measured again" if redo["back"] else
               f"kept, it did not come back within {redo['waited_s']:.0f} s"), file=sys.stderr)
    out = {"kit_version": manifest["kit_version"], "kit_id": manifest["kit_id"], "facts": device_facts(threads),
           "protocol": {**PROTOCOL, **manifest.get("protocol", {})},
           "entries": [{**e, **r} for e, r in zip(manifest["entries"], results)],
           **({"remeasured": redo} if redo else {}),
           **({"focus": manifest["focus"]} if "focus" in manifest else {})}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}; copy it back and run: edgeslim calibrate --fit {args.out} --device NAME")
    return 0


if __name__ == "__main__":
    sys.exit(_kit_main())

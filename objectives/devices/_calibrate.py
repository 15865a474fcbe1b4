"""Calibration: micro-models measured on the device, interleaved and tracked against reference
kernels, sampled adaptively where the fitted latency model errs most (the nn-Meter approach)."""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeslim.objectives._machine import timing_slot
from edgeslim.objectives.devices import _runner
from edgeslim.objectives.devices._kernels import Kernel
from edgeslim.objectives.devices._micro import (CHAINS, IO_SIZES, KERNEL_TYPES, MAX_MACS, MODES, chain_edges, chain_model,
                                                 design, measuring_order, micro_model, neighbour, random_chain,
                                                 random_kernel)
from edgeslim.objectives.devices._model import LatencyModel
from edgeslim.objectives.devices._layout import Layout, probe_layout

__all__ = ["CalibrationResult", "REFERENCE_KERNELS", "SpeedTrack", "calibrate", "measure_reference", "network_record",
           "reference_from"]

@dataclasses.dataclass
class CalibrationResult:
    """Measurements and the fitted model of one calibration run."""

    kernels: list[Kernel]
    measurements: list[dict[str, Any]]
    model: LatencyModel
    rounds: list[dict[str, float]]
    chains: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    track: SpeedTrack | None = None  # the device's speed over the calibration (its reference() per kernel)
    # what was measured again because the device ran off its usual speed (None: nothing was)
    remeasured: dict[str, Any] | None = None


# a compute-bound float conv, an int8 conv, a memory-bound depthwise conv and a Linear: timed at
# the start and end of a calibration and again by check-latency, they tell how far the device's
# speed has moved since (a shared VM's neighbours, a board's thermal state)
REFERENCE_KERNELS: tuple[Kernel, ...] = (
    Kernel("conv", 32, 64, 64, 3, 1, 1, 28, 28, 28, 28),
    Kernel("conv", 8, 64, 64, 3, 1, 1, 28, 28, 28, 28),
    Kernel("conv", 32, 96, 96, 3, 1, 96, 56, 56, 56, 56),
    Kernel("gemm", 32, 512, 512),
)


def measure_reference(threads: int, workdir: Path) -> list[float]:
    """p50 in ms of each of :data:`REFERENCE_KERNELS`, each in its own fresh session."""
    out = _measure_models([functools.partial(micro_model, k) for k in REFERENCE_KERNELS], threads, workdir,
                          10_000_000, lambda: None, sizes=[len(REFERENCE_KERNELS)])
    return [float(m["p50_ms"]) for m in out]


def reference_from(first: Sequence[float], last: Sequence[float]) -> list[float]:
    """One reference time per kernel from two timings of the set (their mean)."""
    return [(a + b) / 2 for a, b in zip(first, last)]


# micro-models measured between two timings of the reference kernels during a calibration
TRACK_EVERY = 200


class SpeedTrack:
    """How fast the device ran over a calibration, from reference-kernel timings taken between
    micro-models (a shared VM's neighbours or a board heating up move it within minutes).

    ``factor(seq)`` is the device's relative slowness when measurement number ``seq`` was taken
    (1.0 = the calibration's median state): the geometric mean over the reference kernels of
    their time at the nearest timings over their median, smoothed over three neighbouring
    timings and interpolated by position. Calibration records and reports it and measures
    again what it timed more than ``_runner.EXCURSION`` off (:func:`_remeasure`); it never
    rescales measurements by it (on the development VM that made network predictions worse: a
    few kernels' drift does not carry over to every kernel, see the README).

    Example:
        >>> t = SpeedTrack()
        >>> for seq, scale in [(0, 1.0), (100, 1.0), (200, 1.2), (300, 1.2), (400, 1.2)]:
        ...     t.add(seq, [scale * 1.0, scale * 2.0])
        >>> round(t.factor(0), 3), round(t.factor(350), 3)
        (0.833, 1.0)
    """

    def __init__(self) -> None:
        self.points: list[tuple[int, list[float]]] = []
        self.seq = 0  # position of the next measurement (used while measuring)
        self.timed_at: int | None = None  # ``seq`` at the last timing (None: not timed yet)
        # Identity models timed with each timing: the per-inference overhead, which every kernel's
        # time is taken net of, is then the calibration's typical value, not one early sample
        self.io: list[tuple[Kernel, dict[str, Any]]] = []

    def add(self, seq: int, p50_ms: Sequence[float]) -> None:
        """Record one timing of the reference kernels, taken before measurement ``seq``."""
        self.points.append((int(seq), [float(v) for v in p50_ms]))
        self._curve: tuple[np.ndarray, np.ndarray] | None = None

    def reference(self) -> list[float]:
        """Each reference kernel's median time over the calibration (the state ``factor`` 1.0 means)."""
        return [float(v) for v in np.median(np.array([p for _, p in self.points]), axis=0)] if self.points else []

    def _fitted(self) -> tuple[np.ndarray, np.ndarray]:
        if getattr(self, "_curve", None) is None:
            seqs = np.array([s for s, _ in self.points], dtype=float)
            self._curve = (seqs, _runner.speed_factors([p for _, p in self.points]))
        return self._curve  # type: ignore[return-value]

    def factor(self, seq: int) -> float:
        """Relative slowness of the device at measurement ``seq`` (1.0 with fewer than three timings)."""
        if len(self.points) < 3:
            return 1.0
        seqs, smooth = self._fitted()
        return float(np.interp(seq, seqs, smooth))

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the timings by measurement position."""
        return {"every": TRACK_EVERY, "points": [[s, p] for s, p in self.points]}

    @classmethod
    def from_entries(cls, entries: Sequence[Mapping[str, Any]]) -> SpeedTrack:
        """The track of a kit's measured entries: each run of consecutive reference entries is one
        timing, positioned at the entry after it."""
        t = cls()
        for pos, run in _runner.reference_timings(entries):
            if len(run) == len(REFERENCE_KERNELS):
                t.add(pos, [float(entries[run[j]]["p50_ms"]) for j in range(len(REFERENCE_KERNELS))])
        return t


speed_ratio = _runner.speed_ratio  # check-latency and the CLI compare reference timings with it


# lone micro-models timed together (interleaved, see _runner.time_group): long enough a stretch
# to average the VM's speed states, short enough that a group's sessions stay small
GROUP = 8


def _measure_models(builders: Sequence[Callable[[int], onnx.ModelProto]], threads: int, workdir: Path,
                    offset: int, tick: Callable[[], None], energy_reader: Any = None,
                    track: SpeedTrack | None = None, sizes: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Save, measure and delete the models, ``sizes`` of them at a time (default ``GROUP``),
    each group interleaved; ``builder(seed)`` makes model ``offset + i``.

    With ``track`` each measurement gets its position ``seq`` in the calibration and the
    reference kernels are timed before the group that reaches each ``TRACK_EVERY``-th one."""
    if sizes is None:
        sizes = [min(GROUP, len(builders) - i) for i in range(0, len(builders), GROUP)]
    out: list[dict[str, Any]] = []
    at = 0
    for size in sizes:
        paths = []
        for i in range(at, at + size):
            paths.append(workdir / f"m{offset + i}.onnx")
            onnx.save(builders[i](offset + i), str(paths[-1]))
        if track is not None and (track.timed_at is None or track.seq // TRACK_EVERY > track.timed_at // TRACK_EVERY):
            time_track(track, threads, workdir)
        with timing_slot():  # workers of a search on this machine pause their fine-tunes meanwhile
            group = _runner.measure_files([str(q) for q in paths], threads,
                                          list(range(offset + at, offset + at + size)), energy_reader=energy_reader)
        for m, q in zip(group, paths):
            if track is not None:
                m["seq"] = track.seq
                track.seq += 1
            out.append(m)
            q.unlink()
            tick()
        at += size
    return out


def time_track(track: SpeedTrack, threads: int, workdir: Path) -> None:
    """One timing for ``track``: the reference kernels and the Identity (overhead) models, together."""
    io = io_kernels()
    ks = list(REFERENCE_KERNELS) + io
    got = _measure_models([functools.partial(micro_model, k) for k in ks], threads, workdir, 20_000_000,
                          lambda: None, sizes=[len(ks)])
    track.add(track.seq, [float(m["p50_ms"]) for m in got[:len(REFERENCE_KERNELS)]])
    track.io += zip(io, got[len(REFERENCE_KERNELS):])
    track.timed_at = track.seq


def _measure(kernels: Sequence[Kernel], threads: int, workdir: Path, offset: int,
             tick: Callable[[], None], energy_reader: Any = None, track: SpeedTrack | None = None
             ) -> list[dict[str, Any]]:
    return _measure_models([functools.partial(micro_model, k) for k in kernels], threads, workdir, offset,
                           tick, energy_reader, track)


def io_kernels() -> list[Kernel]:
    """Identity models of several sizes; they calibrate the per-inference overhead."""
    return [Kernel("io", cin=n, cout=n) for n in IO_SIZES]


def _fit(kernels: Sequence[Kernel], meas: Sequence[dict[str, Any]], device: str, layout: Layout,
         select: bool = False) -> LatencyModel:
    return LatencyModel(device=device, layout=layout).fit(kernels, meas, select=select)


def calibrate(device: str, threads: int, mode: str = "quick", seed: int = 0,
              progress: Callable[[int, int], None] | None = None, energy_reader: Any = None,
              types: Sequence[str] = KERNEL_TYPES, focus: Sequence[Kernel] = (),
              networks: Sequence[Mapping[str, Any]] = (), say: Callable[[str], None] | None = None,
              layout: Layout | None = None, structures: Sequence[Mapping[str, Any]] = ()) -> CalibrationResult:
    """Measure an initial design, then adaptively add points where the model errs most.

    Each round draws fresh validation kernels, records the current model's error on them
    (reported as that round's held-out error), and measures neighbours of the worst quarter.
    ``focus`` kernels (those the models to be searched run, see ``workload_kernels``) join the
    initial design: the model is then exact where the search will ask it most. ``networks``
    (``{"name", "path", "kernels", "edges"}``: whole candidates of those models, exported as
    they would ship) are measured after the chains and fit the boundary savings with them.
    ``structures`` (the same form: random whole networks of the shapes real models have, see
    ``edgeslim.search.structure_networks``) are measured the same way: their kernels, alone, put
    design points where real networks have their shapes, and the networks fit the boundary
    savings and in-network kernel costs.
    ``layout``: the blocked-layout rules the boundary classes use (default: probed here).

    Measurements taken while the device ran more than ``EXCURSION`` off its usual speed (the
    speed track's median) are measured again once it is back (see :func:`_remeasure`); ``say``
    receives what calibration waits for.
    """
    per_type, rounds, n_val, n_nb = MODES[mode]
    rng = np.random.default_rng(seed + 1)
    drawn = [random_chain(rng) for _ in range(CHAINS[mode])]
    total = len(types) * (per_type + rounds * (n_val + n_nb)) + sum(len(ks) + 1 for ks, _ in drawn)
    networks = list(networks) + [{**s, "structure": True} for s in structures]
    total += len(focus) + sum(len(n["kernels"]) + 1 for n in networks)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    def grow(n: int) -> None:
        nonlocal total
        total += n

    track = SpeedTrack()
    lay = probe_layout() if layout is None else layout  # this machine's, found by ONNX Runtime itself

    def fit_so_far() -> LatencyModel:  # with the overhead timings taken so far
        return _fit(kernels + [k for k, _ in track.io], meas + [m for _, m in track.io], device, lay)

    with tempfile.TemporaryDirectory(prefix="edgeslim-cal-") as tmp:
        work = Path(tmp)
        kernels = measuring_order(design(types, per_type, seed) + list(focus), seed)
        meas = _measure(kernels, threads, work, 0, tick, energy_reader, track)
        # chains first: their kernels, measured alone too, join the kernel design
        units = [_Unit([functools.partial(micro_model, k)], [m]) for k, m in zip(kernels, meas)]
        chains, lone_kernels, lone_meas, chain_units = _measure_chains(drawn, threads, work, len(kernels), tick,
                                                                       energy_reader, track, networks)
        kernels += lone_kernels
        meas += lone_meas
        model = fit_so_far()
        history = []
        for r in range(rounds):
            val = [random_kernel(t, rng) for t in types for _ in range(n_val)]
            vm = _measure(val, threads, work, len(kernels), tick, energy_reader, track)
            pred = [model.predict([k], m["io_bytes"])[0] for k, m in zip(val, vm)]
            errs = np.array([abs(p / m["p50_ms"] - 1) for p, m in zip(pred, vm)])
            history.append({"round": r + 1, "heldout_mape": float(errs.mean()),
                            "heldout_within_10pct": float((errs <= 0.10).mean()), "points": len(val)})
            worst = np.argsort(-errs)[: len(types) * n_nb]
            nb = [neighbour(val[i], rng) for i in worst]
            nb = [k if k.macs <= MAX_MACS else val[i] for k, i in zip(nb, worst)]
            nm = _measure(nb, threads, work, len(kernels) + len(val), tick, energy_reader, track)
            units += [_Unit([functools.partial(micro_model, k)], [m]) for k, m in zip(val + nb, vm + nm)]
            kernels += val + nb
            meas += vm + nm
            if r < rounds - 1:  # the last round's points go into the final fit below
                model = fit_so_far()
        time_track(track, threads, work)  # the closing timing
        redo = _remeasure(units + chain_units, track, threads, work, len(kernels), tick, grow, energy_reader, say)
        kernels += [k for k, _ in track.io]
        meas += [m for _, m in track.io]
        # full mode chooses each type's regressor by cross-validation (about a minute of fitting)
        model = _fit(kernels, meas, device, lay, select=mode == "full")
        _fit_chains(model, chains)
    return CalibrationResult(kernels, meas, model, history, chains, track, redo)


@dataclasses.dataclass
class _Unit:
    """Models measured together and the records their results live in (updated in place): a
    lone kernel, or a chain or network with its parts (``whole`` True: the first record also
    holds the parts' times under ``lone``)."""

    builders: list[Callable[[int], onnx.ModelProto]]
    records: list[dict[str, Any]]
    whole: bool = False


_RESULT_KEYS = ("p50_ms", "p95_ms", "runs", "rejected", "io_bytes", "seq", "energy_mj", "wall_s")


def _remeasure(units: Sequence[_Unit], track: SpeedTrack, threads: int, workdir: Path, offset: int,
               tick: Callable[[], None], grow: Callable[[int], None], energy_reader: Any = None,
               say: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """Measure again the units timed while the device ran off its usual speed.

    A board that throttles or a VM whose neighbour gets busy runs everything 20-70 % slower
    for minutes, and a profile fitted on such a stretch predicts badly; rescaling by the
    reference kernels' slowdown helped little, because kernels do not all slow alike (figures
    in studies/BENCHMARKS.md). So the calibration waits until the
    reference kernels run within ``EXCURSION`` of their median again (``_runner.WAIT``) and
    measures those units anew, keeping each new result whose moment was nearer the usual
    state. Returns what it did (None when no unit was off)."""
    if len(track.points) < 3:
        return None
    before = {id(u): track.factor(int(u.records[0]["seq"])) for u in units}
    off = [u for u in units if _runner.away(before[id(u)])]
    if not off:
        return None
    n = sum(len(u.builders) for u in off)
    worst = max(before[id(u)] for u in off)
    summary: dict[str, Any] = {"measurements": n, "worst_factor": worst}
    back, now, waited = _runner.wait_until_usual(lambda: measure_reference(threads, workdir), track.reference(),
                                                 say=say)
    summary.update(back=back, waited_s=waited, factor_then=now, replaced=0)
    if not back:
        return summary
    grow(n)
    time_track(track, threads, workdir)
    lone = [u for u in off if not u.whole]
    sizes = [min(GROUP, len(lone) - i) for i in range(0, len(lone), GROUP)] + [len(u.builders) for u in off if u.whole]
    order = lone + [u for u in off if u.whole]
    got = _measure_models([b for u in order for b in u.builders], threads, workdir, offset, tick, energy_reader,
                          track, sizes=sizes)
    time_track(track, threads, workdir)
    at = 0
    for u in order:
        new = got[at: at + len(u.builders)]
        at += len(u.builders)
        if not _runner.nearer_usual(track.factor(int(new[0]["seq"])), before[id(u)]):
            continue  # the device was no nearer its usual state this time
        for rec, m in zip(u.records, new):
            for key in _RESULT_KEYS:
                rec.pop(key, None)
            rec.update(m)
        if u.whole:
            u.records[0]["lone"] = [{k: m[k] for k in _LONE_KEYS if k in m} for m in new[1:]]
        summary["replaced"] += len(u.builders)
    return summary


_LONE_KEYS = ("p50_ms", "p95_ms", "io_bytes", "seq")


def _measure_chains(drawn: Sequence[tuple[list[Kernel], list[bool]]], threads: int, workdir: Path, offset: int,
                    tick: Callable[[], None], energy_reader: Any = None, track: SpeedTrack | None = None,
                    networks: Sequence[Mapping[str, Any]] = (),
                    ) -> tuple[list[dict[str, Any]], list[Kernel], list[dict[str, Any]], list[_Unit]]:
    """Each chain (then each focus network) timed together with each of its kernels alone
    (interleaved, the same machine states): its boundary saving is then measured lone times less its own, free of the
    kernel model's error and of the device's drift between the two. Returns the chain and network
    records, the lone kernels with their measurements, and each record as a unit with its parts
    (for :func:`_remeasure`)."""
    items: list[tuple[Callable[[int], onnx.ModelProto], list[Kernel], dict[str, Any]]] = []
    for ks, acts in drawn:
        items.append((functools.partial(chain_model, ks, acts), list(ks),
                      {"chain": {"kernels": [dataclasses.asdict(k) for k in ks], "acts": list(acts)}}))
    for net in networks:
        ks = [dataclasses.replace(k, layer="") for k in net["kernels"]]
        items.append((functools.partial(_load, str(net["path"])), ks,
                      {"network": network_record(net), **({"structure": True} if net.get("structure") else {})}))
    builders: list[Callable[[int], onnx.ModelProto]] = []
    for build, ks, _ in items:
        builders.append(build)
        builders += [functools.partial(micro_model, k) for k in ks]
    meas = _measure_models(builders, threads, workdir, offset, tick, energy_reader, track,
                           sizes=[1 + len(ks) for _, ks, _ in items])
    records, lone_kernels, lone_meas, units, at = [], [], [], [], 0
    for _, ks, what in items:
        whole, parts = meas[at], meas[at + 1: at + 1 + len(ks)]
        unit_builders = builders[at: at + 1 + len(ks)]
        at += 1 + len(ks)
        records.append({**what, "lone": [{k: m[k] for k in _LONE_KEYS if k in m} for m in parts], **whole})
        units.append(_Unit(unit_builders, [records[-1], *parts], whole=True))
        lone_kernels += ks
        lone_meas += parts
    return records, lone_kernels, lone_meas, units


def _fit_chains(model: LatencyModel, chains: Sequence[dict[str, Any]]) -> None:
    """Fit the boundary savings from chain records and whole-network records (``network``: a
    focus model's candidate with its kernels and edges), each against its own lone kernels, and
    the tail mix (:meth:`LatencyModel.fit_tail`) from their p95/p50 ratios."""
    rows, tails, nets = [], [], []
    for c in chains:
        if "network" in c:
            ks = [Kernel(**k) for k in c["network"]["kernels"]]
            edges = [(int(a), int(b), bool(act)) for a, b, act in c["network"]["edges"]]
        else:
            ks = [Kernel(**k) for k in c["chain"]["kernels"]]
            edges = chain_edges(ks, c["chain"]["acts"])
        if all(model.covers(k) for k in ks):
            lone = c.get("lone")
            # the lone kernels' own times, each less the overhead its micro-model paid
            lone_ms = None if not lone else sum(float(m["p50_ms"]) - model.overhead_ms(float(m["io_bytes"]))
                                                for m in lone)
            rows.append((ks, edges, float(c["p50_ms"]), float(c["io_bytes"]), lone_ms))
            if float(c.get("p95_ms", 0.0)) > float(c["p50_ms"]) > 0:
                (nets if "network" in c else tails).append((ks, float(c["p50_ms"]), float(c["p95_ms"]),
                                                            float(c["io_bytes"])))
    model.fit_boundaries(rows)
    # how kernels' slow runs add up in an inference: from whole networks where the calibration
    # measured some (short chains' tails coincide more than a network's many kernels' do)
    model.fit_tail(nets if len(nets) >= 3 else tails + nets)


def network_record(net: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON form of a focus network (see :func:`calibrate`): name, kernels and edges."""
    return {"name": net["name"], "kernels": [dataclasses.asdict(k) for k in net["kernels"]],
            "edges": [list(e) for e in net["edges"]]}


def _load(path: str, seed: int) -> onnx.ModelProto:
    return onnx.load(path)

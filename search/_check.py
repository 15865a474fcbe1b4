"""check-latency: how well a device profile predicts measured latency of real candidates."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.objectives import build_artifact, measure_latency
from edgeslim.objectives.devices import (PROTOCOL, DeviceProfile, Kernel, extract_graph, io_bytes, measure_reference,
                                         reference_entries, reference_from, reference_timings, seal_kit, speed_ratio,
                                         start_kit)
from edgeslim.search._workloads import DigitsCNN, DigitsResNet
from edgeslim.spaces import CompressionSpace, Plan, RuleSet, SpecError, layer_bits

__all__ = ["CheckRow", "CheckSummary", "FOCUS_PLANS", "VALIDATION_WORKLOADS", "check_latency", "focus_networks",
           "random_plan", "rows_from_measurements", "sampled_candidates", "summarize", "workload_kernels",
           "write_check_kit"]

# fresh sessions each candidate is timed in (median of their medians; see measure_latency)
CHECK_SESSIONS = 3
# how each of those sessions times a candidate, here and in check kits
CHECK_TIMING = {"warmup": 20, "min_runs": 10, "max_runs": 2000, "budget_s": 0.3}
# random plans per target model whose kernels a focused calibration measures (beside the dense
# and uniform int8/int4 presets), by calibration mode: at least `min`, then more while the
# target's extraction time stays under `seconds` (small models get many plans, large ones few)
FOCUS_PLANS = {"quick": {"min": 6, "max": 40, "seconds": 15.0, "networks": 3},
               "full": {"min": 20, "max": 150, "seconds": 60.0, "networks": 6}}
# plans for calibration are drawn from their own streams, never from check-latency's seeds
_FOCUS_SEED = 7919
_NETWORK_SEED = 104729


def _tv(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=1000)
    return make


# name -> (factory, input shape); random weights suffice for latency
VALIDATION_WORKLOADS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "digits-cnn": (DigitsCNN, (1, 1, 8, 8)),
    "digits-resnet": (DigitsResNet, (1, 1, 32, 32)),
    "resnet18@224": (_tv("resnet18"), (1, 3, 224, 224)),
    "mobilenet_v2@224": (_tv("mobilenet_v2"), (1, 3, 224, 224)),
}


@dataclasses.dataclass(frozen=True)
class CheckRow:
    """One sampled candidate: predicted and measured p50 (and p95) in ms."""

    workload: str
    plan: str
    predicted_ms: float
    measured_ms: float
    remeasured_ms: float | None = None  # the same file timed again after all others (``repeat``)
    # how much slower (>1) the reference kernels ran around this measurement than during calibration
    speed: float | None = None
    predicted_p95_ms: float | None = None
    measured_p95_ms: float | None = None  # over every timed run of the candidate's sessions

    @property
    def error(self) -> float:
        """Signed relative error of the prediction."""
        return self.predicted_ms / self.measured_ms - 1.0

    @property
    def p95_error(self) -> float | None:
        """Signed relative error of the p95 prediction (None: no p95 on this row)."""
        if self.predicted_p95_ms is None or self.measured_p95_ms is None:
            return None
        return self.predicted_p95_ms / self.measured_p95_ms - 1.0

    @property
    def repeat_error(self) -> float | None:
        """How far the second measurement of the same file lies from the first (None: not repeated)."""
        return None if self.remeasured_ms is None else self.remeasured_ms / self.measured_ms - 1.0


@dataclasses.dataclass(frozen=True)
class CheckSummary:
    """Share within ±10 %, MAPE, Spearman rank correlation, worst cases.

    Example:
        >>> s = summarize([CheckRow("w", "p", 1.0, 1.0, 1.05), CheckRow("w", "q", 2.1, 2.0, 2.5)])
        >>> s.within_10pct, round(s.mape, 3), s.repeat_within_10pct
        (1.0, 0.025, 0.5)
    """

    n: int
    within_10pct: float
    mape: float
    spearman: float
    worst: tuple[CheckRow, ...]
    # share of repeat measurements within ±10 % of the first, and their mean deviation: the
    # ceiling measurement noise puts on any predictor here (None when not repeated)
    repeat_within_10pct: float | None = None
    repeat_mape: float | None = None
    # the same for the p95 predictions (None when the rows carry no p95)
    p95_within_10pct: float | None = None
    p95_mape: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"n": self.n, "within_10pct": self.within_10pct, "mape": self.mape, "spearman": self.spearman,
                "repeat_within_10pct": self.repeat_within_10pct, "repeat_mape": self.repeat_mape,
                "p95_within_10pct": self.p95_within_10pct, "p95_mape": self.p95_mape,
                "worst": [dict(dataclasses.asdict(r), error=r.error) for r in self.worst]}


def summarize(rows: Sequence[CheckRow], worst: int = 5) -> CheckSummary:
    """Aggregate rows into the figures check-latency prints."""
    from scipy.stats import spearmanr

    errs = np.array([abs(r.error) for r in rows])
    rho = float(spearmanr([r.predicted_ms for r in rows], [r.measured_ms for r in rows]).statistic) \
        if len(rows) > 2 else float("nan")
    order = sorted(rows, key=lambda r: -abs(r.error))[:worst]
    rep = np.array([abs(r.repeat_error) for r in rows if r.repeat_error is not None])
    tail = np.array([abs(r.p95_error) for r in rows if r.p95_error is not None])
    return CheckSummary(len(rows), float((errs <= 0.10).mean()), float(errs.mean()), rho, tuple(order),
                        float((rep <= 0.10).mean()) if len(rep) else None, float(rep.mean()) if len(rep) else None,
                        float((tail <= 0.10).mean()) if len(tail) else None, float(tail.mean()) if len(tail) else None)


def check_latency(profile: DeviceProfile, samples_per_workload: int, seed: int = 0,
                  workloads: Sequence[str] = tuple(VALIDATION_WORKLOADS),
                  progress: Callable[[int, int], None] | None = None,
                  threads: int | None = None, repeat: bool = False,
                  reference: Sequence[float] | None = None) -> list[CheckRow]:
    """Sample random plans, predict with ``profile`` and measure the exported artifacts here.

    Measurement uses the profile's thread count unless ``threads`` says otherwise (to check
    that a profile is specific to its thread setting); each artifact is timed in
    ``CHECK_SESSIONS`` fresh sessions and their median taken. With ``repeat`` every file is
    timed a second time after all of them were, which shows how far this machine's own
    measurements wander (``CheckRow.remeasured_ms``). With ``reference`` (the profile's
    reference-kernel times) those kernels are timed before each candidate and after the last,
    and each row records the device's speed around its measurement relative to calibration
    (``CheckRow.speed``): drift of the device, told apart from error of the model.
    """
    assert profile.latency_model is not None
    rows: list[CheckRow] = []
    files: list[tuple[Path, tuple[int, ...]]] = []
    total = samples_per_workload * len(workloads) * (2 if repeat else 1)
    n_threads = threads or profile.threads

    def measure(path: Path, shape: tuple[int, ...]) -> tuple[float, float]:
        got = measure_latency(path, shape, threads=n_threads, sessions=CHECK_SESSIONS, **CHECK_TIMING)
        return got.p50_ms, got.p95_ms

    timings: list[list[float]] = []
    with tempfile.TemporaryDirectory(prefix="edgeslim-check-") as tmp:
        def time_reference() -> None:
            if reference:
                timings.append(measure_reference(n_threads, Path(tmp)))

        for w, plan, model, x, path in sampled_candidates(profile, samples_per_workload, seed, workloads, Path(tmp)):
            predicted, predicted_p95, _ = profile.latency_model.predict_module(model, x)
            time_reference()
            p50, p95 = measure(path, tuple(x.shape))
            rows.append(CheckRow(w, plan.summary(), predicted, p50, predicted_p95_ms=predicted_p95,
                                 measured_p95_ms=p95))
            files.append((path, tuple(x.shape)))
            if progress:
                progress(len(rows), total)
        time_reference()
        if reference:
            rows = [dataclasses.replace(r, speed=speed_ratio(reference_from(a, b), reference))
                    for r, a, b in zip(rows, timings, timings[1:])]
        if repeat:
            for i, (path, shape) in enumerate(files):
                rows[i] = dataclasses.replace(rows[i], remeasured_ms=measure(path, shape)[0])
                if progress:
                    progress(len(rows) + i + 1, total)
    return rows


def sampled_candidates(profile: DeviceProfile, samples_per_workload: int, seed: int, workloads: Sequence[str],
                       workdir: Path) -> Iterator[tuple[str, Plan, nn.Module, torch.Tensor, Path]]:
    """The candidates a check measures, exported into ``workdir``: per workload the dense plan,
    then random plans, realized as ``profile``'s device runs them (its int8 range). One seed
    gives the same plans here and in a check kit.

    Example:
        >>> [w for w, *_ in sampled_candidates(profile, 2, 0, ["digits-cnn"], Path(tmp))]  # doctest: +SKIP
        ['digits-cnn', 'digits-cnn']
    """
    rng = np.random.default_rng(seed)
    for w in workloads:
        factory, shape = VALIDATION_WORKLOADS[w]
        torch.manual_seed(seed)
        base = factory().eval()
        x = torch.randn(shape)
        space = CompressionSpace.build(base, x)
        dists = space.distributions()
        for i in range(samples_per_workload):
            drawn = random_plan(space, rng, dists)  # drawn for the dense one too: seeds keep their plans
            plan = drawn if i else space.dense_plan()
            model = space.realize(base, plan, reduce_range=profile.int8_reduce_range)
            yield w, plan, model, x, _export_candidate(model, x, workdir, f"{w}-{i}")


def write_check_kit(profile: DeviceProfile, kit_dir: Path, samples_per_workload: int, seed: int = 0,
                    workloads: Sequence[str] = tuple(VALIDATION_WORKLOADS), repeat: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """A check kit for a remote device: the sampled candidates as ONNX files, the reference
    kernels, ``kit.json`` and the calibration kit's ``run_kit.py`` (Python, numpy, onnxruntime).

    On the device, ``run_kit.py`` times the candidates as check-latency does here (each in
    ``CHECK_SESSIONS`` fresh sessions, ``CHECK_TIMING``), the reference kernels before each and
    after the last, and with ``repeat`` every candidate again at the end. Each candidate's
    kernels, edges and input/output bytes travel in the manifest, so :func:`rows_from_measurements`
    predicts with the profile as it is when the measurements come back.

    Example:
        >>> write_check_kit(profile, Path("check-kit"), 6)  # doctest: +SKIP
    """

    assert profile.latency_model is not None
    start_kit(kit_dir)
    candidates: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []

    def time_reference() -> None:
        entries.extend(reference_entries(f"r{len(entries)}"))

    total = samples_per_workload * len(workloads)
    with tempfile.TemporaryDirectory(prefix="edgeslim-check-kit-") as tmp:
        for w, plan, model, x, path in sampled_candidates(profile, samples_per_workload, seed, workloads, Path(tmp)):
            kernels, edges = extract_graph(model, x)
            io = io_bytes(kernels, x)
            p50, p95 = profile.latency_model.predict(kernels, io, edges)
            j = len(candidates)
            name = f"models/cand_{j:03d}.onnx"
            shutil.copyfile(path, kit_dir / name)
            candidates.append({"workload": w, "plan": plan.summary(), "input_shape": list(x.shape),
                               "kernels": [dataclasses.asdict(k) for k in kernels], "edges": [list(e) for e in edges],
                               "io_bytes": io, "predicted_ms": p50, "predicted_p95_ms": p95})
            time_reference()
            entries.append({"file": name, "candidate": j, "sessions": CHECK_SESSIONS, "group": f"c{j}"})
            if progress:
                progress(j + 1, total)
    time_reference()
    if repeat:
        entries.extend({"file": f"models/cand_{j:03d}.onnx", "candidate": j, "repeat": True,
                        "sessions": CHECK_SESSIONS, "group": f"c{j}r"} for j in range(len(candidates)))
    return seal_kit(kit_dir, [candidates, entries], {
        "purpose": "check", "device": profile.name, "profile_id": profile.profile_id, "threads": profile.threads,
        "seed": seed, "protocol": PROTOCOL,
        # every run kept (no spike dropped), as check-latency measures here
        "check_protocol": {**CHECK_TIMING, "spike_factor": 1e9, "rounds": PROTOCOL["rounds"]},
        "candidates": candidates, "entries": entries})


def rows_from_measurements(profile: DeviceProfile, data: Mapping[str, Any],
                           reference: Sequence[float] | None = None) -> list[CheckRow]:
    """Check rows from a check kit's ``measurements.json`` content: each candidate predicted
    now by ``profile`` (from the kernels, edges and bytes the kit carries) against its time on
    the device; ``speed`` from the reference timings around it against ``reference`` (the
    profile's), and ``remeasured_ms`` where the kit timed the candidate again.

    Raises :class:`SpecError` for measurements that are not a check kit's, or that lack a result.

    Example:
        >>> rows = rows_from_measurements(profile, json.loads(Path("measurements.json").read_text()))  # doctest: +SKIP
    """
    assert profile.latency_model is not None
    if data.get("purpose") != "check":
        raise SpecError("these measurements come from a calibration kit; fit them with `edgeslim calibrate --fit`, "
                        "or write a check kit with `edgeslim check-latency --kit DIR`")
    entries = list(data.get("entries") or [])
    candidates = list(data.get("candidates") or [])
    for i, e in enumerate(entries):
        if "p50_ms" not in e or ("candidate" in e and not 0 <= int(e["candidate"]) < len(candidates)):
            raise SpecError(f"measurements.entries[{i}] has no result or names no candidate of the kit; "
                            "run the kit's run_kit.py again")
    first: dict[int, int] = {}
    again: dict[int, float] = {}
    for i, e in enumerate(entries):
        if "candidate" in e:
            if e.get("repeat"):
                again[int(e["candidate"])] = float(e["p50_ms"])
            else:
                first.setdefault(int(e["candidate"]), i)
    missing = [j for j in range(len(candidates)) if j not in first]
    if missing:
        raise SpecError(f"measurements lack candidates {missing}; run the kit's run_kit.py again")
    timings = [(pos, [float(entries[j]["p50_ms"]) for _, j in sorted(run.items())])
               for pos, run in reference_timings(entries)]
    rows = []
    for j, c in enumerate(candidates):
        kernels = [Kernel(**k) for k in c["kernels"]]
        p50, p95 = profile.latency_model.predict(kernels, float(c["io_bytes"]), [tuple(e) for e in c["edges"]])
        e = entries[first[j]]
        speed = None
        before = [t for pos, t in timings if pos <= first[j]]
        after = [t for pos, t in timings if pos > first[j]]
        if reference and before and after and len(before[-1]) == len(after[0]) == len(reference):
            speed = speed_ratio(reference_from(before[-1], after[0]), reference)
        rows.append(CheckRow(c["workload"], c["plan"], p50, float(e["p50_ms"]), remeasured_ms=again.get(j),
                             speed=speed, predicted_p95_ms=p95, measured_p95_ms=float(e["p95_ms"])))
    return rows


def _export_candidate(model: nn.Module, x: torch.Tensor, workdir: Path, stem: str) -> Path:
    """A realized candidate's artifact as it would ship, quantized layers calibrated on four
    random inputs (random weights and inputs suffice for latency)."""
    with torch.no_grad():
        model(x)  # settle activation observers of quantized layers
    calib = [np.random.default_rng(j).standard_normal(tuple(x.shape)).astype(np.float32) for j in range(4)]
    return build_artifact(model, x, layer_bits(model), calib, workdir, stem=stem)[0]


def random_plan(space: CompressionSpace, rng: np.random.Generator,
                dists: Mapping[str, Any] | None = None) -> Plan:
    """A plan with every knob drawn uniformly from its choices (``dists``: the space's
    distributions, passed in when drawing many).

    Example:
        >>> random_plan(space, np.random.default_rng(0))  # doctest: +SKIP
    """
    dists = dists if dists is not None else space.distributions()
    return space.plan_from_params({k: d.choices[int(rng.integers(len(d.choices)))] for k, d in dists.items()})


def _focus_target(target: str) -> tuple[nn.Module, torch.Tensor, RuleSet | None]:
    """A built-in check workload by name, or the model, input and space rules of a study spec."""
    if target in VALIDATION_WORKLOADS:
        factory, shape = VALIDATION_WORKLOADS[target]
        torch.manual_seed(0)
        return factory().eval(), torch.randn(shape), None
    path = Path(target)
    if path.suffix == ".toml" and path.is_file():
        from edgeslim.search._spec import load_spec
        from edgeslim.search._workloads import _user_model, builtin_model

        spec = load_spec(path)
        torch.manual_seed(spec.seed)
        if spec.model.builtin:
            model, chw, _ = builtin_model(spec.model.builtin)
            shape = (1, *chw)
        else:
            model, shape = _user_model(spec), (1, *spec.model.input_shape)
        return model.eval(), torch.randn(shape), spec.space.rule_set()
    raise SpecError(f"--for {target!r} is neither a built-in workload ({', '.join(VALIDATION_WORKLOADS)}) "
                    "nor a study spec .toml file; give one of those")


def workload_kernels(targets: Sequence[str], min_plans: int, max_plans: int | None = None,
                     seconds: float = 0.0, seed: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> tuple[list[Kernel], dict[str, int]]:
    """The distinct kernels that candidates of the target models run: a calibration focused on them.

    For each target (a built-in workload name or a study spec path) the dense plan, the uniform
    int8 and int4 presets and at least ``min_plans`` random plans of its compression space are
    realized and their kernels extracted; more random plans follow, up to ``max_plans``, while
    that target has taken less than ``seconds`` (a small model's space is covered densely, a
    large one's sparsely). Kernels repeated across plans are kept once. Random weights suffice:
    kernel shapes do not depend on them. Returns the kernels and the plans drawn per target.

    Example:
        >>> ks, plans = workload_kernels(["digits-cnn"], min_plans=2)
        >>> len(ks) > 10 and all(k.layer == "" for k in ks), plans
        (True, {'digits-cnn': 5})
    """
    import time


    rng = np.random.default_rng(seed + _FOCUS_SEED)
    found: dict[tuple[Any, ...], Kernel] = {}
    built = [_focus_target(t) for t in targets]  # bad targets fail before any work
    most = max(max_plans or min_plans, min_plans)
    total, done, drawn_per = len(built) * (most + 3), 0, {}
    for target, (model, x, rules) in zip(targets, built):
        start = time.perf_counter()
        space = CompressionSpace.build(model, x, rules)
        dists = space.distributions()
        presets = [space.dense_plan(), space.uniform_plan(bits=8), space.uniform_plan(bits=4)]
        n = 0
        for plan in itertools.chain(presets, iter(lambda: random_plan(space, rng, dists), None)):
            kernels, _ = extract_graph(space.realize(model, plan), x)
            for k in kernels:
                found.setdefault(k.shape, dataclasses.replace(k, layer=""))
            n += 1
            done += 1
            if progress:
                progress(done, total)
            randoms = n - len(presets)
            if randoms >= most or (randoms >= min_plans and time.perf_counter() - start >= seconds):
                break
        drawn_per[target] = n
        total -= most + 3 - n  # what this target did not need
    return list(found.values()), drawn_per


def focus_networks(targets: Sequence[str], per_target: int, workdir: Path, seed: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Whole candidates of the target models, exported as they would ship: calibration measures
    them and fits the boundary savings (what connected kernels save against lone ones) on real
    networks as well as on its synthetic chains.

    Per target the dense plan, the uniform int8 preset and random plans (their own stream,
    never check-latency's) up to ``per_target``; random weights suffice. Each entry has
    ``name``, ``path`` (the ONNX file in ``workdir``), ``kernels`` and ``edges``.

    Example:
        >>> nets = focus_networks(["digits-cnn"], 2, Path(tmp))  # doctest: +SKIP
        >>> [n["name"] for n in nets]  # doctest: +SKIP
        ['digits-cnn/dense', 'digits-cnn/int8']
    """

    rng = np.random.default_rng(seed + _NETWORK_SEED)
    built = [_focus_target(t) for t in targets]
    out: list[dict[str, Any]] = []
    for ti, (target, (model, x, rules)) in enumerate(zip(targets, built)):
        space = CompressionSpace.build(model, x, rules)
        dists = space.distributions()
        plans = [("dense", space.dense_plan()), ("int8", space.uniform_plan(bits=8))]
        plans += [(f"random{i}", random_plan(space, rng, dists)) for i in range(max(per_target - 2, 0))]
        for j, (tag, plan) in enumerate(plans[:per_target]):
            realized = space.realize(model, plan)
            path = _export_candidate(realized, x, workdir, f"net{ti}_{j}")
            kernels, edges = extract_graph(realized, x)
            out.append({"name": f"{Path(target).stem if target.endswith('.toml') else target}/{tag}",
                        "path": str(path), "kernels": kernels, "edges": edges})
            if progress:
                progress(len(out), len(targets) * per_target)
    return out

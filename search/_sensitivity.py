"""Per-knob sensitivity, an additive surrogate fitted on completed trials, and a front solved
with scipy's MILP, enqueued as trials: the ``sensitivity`` sampler's seeding step.

The flow, once per study (results stored on it, so a resumed run or another worker reuses them):

1. :func:`sensitivity_profile`: every value of every knob applied alone to the dense model, no
   fine-tune, scored on a fixed calibration subset of the training split (loss and accuracy),
   its exact size change and its latency change (the profile's model per knob; with ``local``,
   uniform plans measured paired with dense, shared out by each layer's MACs).
2. :func:`fit_surrogate`: predicted accuracy drop (pp) = sum over knob kinds of a weight times
   the summed loss increases of the plan's knobs of that kind; the weights are fitted by
   non-negative least squares on completed trials (the presets give one kind at a time), since a
   fine-tune recovers pruning and quantization by different amounts.
3. :func:`solve_front`: a multiple-choice knapsack per (latency, size) budget of a grid, solved
   with ``scipy.optimize.milp``: minimum predicted drop with one value per knob.
4. :func:`seed_study`: all of it, then the solved plans enqueued as trials (``proposed_by`` =
   ``"surrogate"``); the study's sampler continues after them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
import torch
import torch.nn.functional as F
from optuna.trial import TrialState

from edgeslim.objectives import logits_of, model_size_bytes
from edgeslim.search._objective import CompressionObjective, is_dense
from edgeslim.search._progress import Progress
from edgeslim.spaces import CompressionSpace, Plan, SpecError

__all__ = ["KIND_OF_SUFFIX", "KnobEffect", "RESEED_EVERY", "RESEED_PLANS", "ReseedCallback", "SEED_PLANS", "SeedResult", "SensitivityProfile", "Surrogate", "fit_surrogate",
           "load_profile", "optimize_seeded", "seed_study", "sensitivity_profile", "solve_front", "space_key", "surrogate_quality"]

KIND_OF_SUFFIX = {"sparsity": "sparsity", "rank": "rank", "bits": "bits"}
DENSE_VALUE = {"sparsity": 0.0, "rank": 1.0, "bits": 32}
ATTR = "sensitivity"  # study user attribute prefix; the space key follows it
SEED_PLANS = 8  # solved plans enqueued after the presets
RESEED_EVERY, RESEED_PLANS = 6, 4  # then: after 6 more trials, 4 more solved plans (refitted), and so on
# fractions of the largest predicted saving each budget of the grid allows
# (dense enough that later rounds, refitted on more trials, still find plans no trial has tried)
SIZE_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.97)
LATENCY_GRID = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)


@dataclasses.dataclass(frozen=True)
class KnobEffect:
    """What one knob value does alone to the dense model (no fine-tune).

    ``loss_delta`` and ``accuracy_drop_pp`` are NaN where the forward pass broke (the value is
    then left out of the solve); sizes in bytes, latency in ms.

    Example:
        >>> KnobEffect("fc.bits", "fc", "bits", 8, 0.01, 0.2, -300.0, -0.001).kind
        'bits'
    """

    param: str
    target: str
    kind: str
    value: float
    loss_delta: float
    accuracy_drop_pp: float
    size_delta: float
    latency_delta_ms: float


@dataclasses.dataclass(frozen=True)
class SensitivityProfile:
    """Every knob value's effect on one model and space (see :func:`sensitivity_profile`).

    Example:
        >>> p = SensitivityProfile("k", 8, 0.5, 1.0, 100.0, 1.0, "test", (), 0.1)
        >>> SensitivityProfile.from_dict(p.to_dict()) == p
        True
    """

    space_key: str
    samples: int
    base_loss: float
    base_accuracy: float
    dense_size: float
    dense_latency_ms: float
    latency_source: str
    effects: tuple[KnobEffect, ...]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as None, since JSON has no NaN)."""
        d = dataclasses.asdict(self)
        d["effects"] = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in e.items()}
                        for e in d["effects"]]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityProfile:
        """Inverse of :meth:`to_dict`."""
        effects = tuple(KnobEffect(**{k: (math.nan if v is None else v) for k, v in e.items()})
                        for e in data["effects"])
        return cls(**{**data, "effects": effects})

    def broken(self) -> list[KnobEffect]:
        """Knob values whose forward pass failed or produced NaN."""
        return [e for e in self.effects if not math.isfinite(e.loss_delta)]

    def heatmap(self) -> tuple[list[str], list[str], list[list[float | None]]]:
        """(rows: layers and pruning groups, columns: "kind value", accuracy drop in pp or None):
        the report's heatmap, as plain values.

        Example:
            >>> e = KnobEffect("a.bits", "a", "bits", 8, 0.1, 2.0, -1.0, 0.0)
            >>> SensitivityProfile("k", 8, 0.5, 1.0, 10.0, 1.0, "t", (e,), 0.1).heatmap()
            (['a'], ['bits 8'], [[2.0]])
        """
        rows = list(dict.fromkeys(e.target for e in self.effects))
        cols = sorted({f"{e.kind} {_fmt(e.value)}" for e in self.effects},
                      key=lambda c: (c.split()[0], float(c.split()[1])))
        cell = {(e.target, f"{e.kind} {_fmt(e.value)}"): e.accuracy_drop_pp for e in self.effects}
        z = [[(None if (v := cell.get((r, c))) is None or not math.isfinite(v) else round(v, 3)) for c in cols]
             for r in rows]
        return rows, cols, z


def _fmt(value: float) -> str:
    return f"{int(value)}" if float(value).is_integer() else f"{value:g}"


def space_key(space: CompressionSpace) -> str:
    """A short hash of a space's knobs and choices: a stored profile is reused only for the
    same space.

    Example:
        >>> from torch import nn
        >>> s = CompressionSpace.build(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.zeros(1, 4))
        >>> len(space_key(s))
        12
    """
    knobs = sorted((k.param_name, [float(c) for c in k.choices]) for k in space.knobs if len(k.choices) > 1)
    return hashlib.sha256(json.dumps([knobs, space.channel_multiple]).encode()).hexdigest()[:12]


def _dense_params(space: CompressionSpace) -> dict[str, Any]:
    return space.params_of(space.dense_plan())


def _calibration_batch(objective: CompressionObjective, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    train = objective.workload.data.train
    n = min(samples, len(train))
    if n == 0:
        raise SpecError("the training split is empty: the sensitivity pass needs training samples; "
                        "give [data] a training split")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(objective.seed))[:n]
    items = [train[int(i)] for i in order]
    xs = torch.stack([torch.as_tensor(x) for x, _ in items])
    ys = torch.tensor([int(y) for _, y in items])
    return xs, ys


@torch.no_grad()
def _loss_accuracy(model: torch.nn.Module, xs: torch.Tensor, ys: torch.Tensor, batch: int = 128) -> tuple[float, float]:
    model.eval()
    total, correct = 0.0, 0
    for i in range(0, len(xs), batch):
        logits = logits_of(model(xs[i:i + batch]))
        total += float(F.cross_entropy(logits, ys[i:i + batch], reduction="sum"))
        correct += int((logits.argmax(-1) == ys[i:i + batch]).sum())
    return total / len(xs), correct / len(xs)


def _local_latency_deltas(objective: CompressionObjective, space: CompressionSpace,
                          say: Callable[[str], None]) -> tuple[dict[tuple[str, float], float], float]:
    """(kind, value) -> latency change (ms) of the uniform plan at that value, measured paired
    with the dense artifact (``local``: no latency model to ask per knob), and the dense
    artifact's median latency over those pairs (NaN if none was timed)."""
    out: dict[tuple[str, float], float] = {}
    refs: list[float] = []
    values = sorted({(k.suffix, float(c)) for k in space.knobs if len(k.choices) > 1 for c in k.choices
                     if float(c) != DENSE_VALUE[k.suffix]})
    for kind, value in values:
        plan = space.uniform_plan(**{kind: (int(value) if kind == "bits" else value)})
        try:
            metrics = objective.score(plan, steps=0, objectives=["latency_ms"]).metrics
        except Exception as e:  # a uniform plan ONNX cannot run: that kind's latency stays unknown (0)
            say(f"sensitivity: uniform {kind} {_fmt(value)} could not be timed ({type(e).__name__}: {e}); "
                "its latency change counts as 0 in the solve")
            continue
        ref = metrics.get("latency_reference_ms")
        speedup = metrics.get("latency_speedup_paired")
        if ref is not None:
            refs.append(ref)
        if ref is not None and speedup:
            out[(kind, value)] = ref / speedup - ref  # the pair's ratio: robust to drift between runs
        else:
            out[(kind, value)] = metrics["latency_ms"] - (ref if ref is not None else metrics["latency_ms"])
    return out, float(np.median(refs)) if refs else math.nan


def sensitivity_profile(objective: CompressionObjective, samples: int = 256,
                        log: Callable[[str], None] | None = None, stream: Any = None) -> SensitivityProfile:
    """Apply every value of every knob alone to the dense model and record its effect (see
    :class:`KnobEffect`), on ``samples`` training samples chosen with the objective's seed.

    A value whose forward pass raises or gives NaN is recorded as NaN and named in one warning;
    the solve leaves it out.

    Example:
        >>> from edgeslim.search import DigitsCNN, digits_splits
        >>> from edgeslim.objectives import FinetuneConfig
        >>> data, _ = digits_splits(8, 0.3, seed=0)
        >>> obj = CompressionObjective(DigitsCNN(), torch.zeros(1, 1, 8, 8), data.train, data.val,
        ...                            objectives=["accuracy", "size_bytes"], finetune=FinetuneConfig(steps=0))
        >>> p = sensitivity_profile(obj, samples=64)
        >>> len(p.effects) > 0 and all(e.size_delta <= 0 for e in p.effects)
        True
    """
    say = log or (lambda msg: None)
    t0 = time.perf_counter()
    space, model, device = objective.space, objective.workload.model, objective.device
    reduce_range = device.int8_reduce_range
    xs, ys = _calibration_batch(objective, samples)
    base_loss, base_acc = _loss_accuracy(model, xs, ys)
    dense = space.realize(model, space.dense_plan(), reduce_range=reduce_range)
    dense_size = float(model_size_bytes(dense))
    predicted = device.predicts_latency
    lm = device.latency_model
    dense_latency = float(lm.predict_module(dense, objective.workload.example_input)[0]) if lm is not None else math.nan
    local: dict[tuple[str, float], float] = {}
    measuring = "latency_ms" in objective.metric_names and not predicted
    if measuring:  # the dense artifact was timed in every pair: no separate measurement of it
        local, dense_latency = _local_latency_deltas(objective, space, say)
    knobs = [k for k in space.knobs if len(k.choices) > 1]
    todo = [(k, c) for k in knobs for c in k.choices if float(c) != DENSE_VALUE[k.suffix]]
    # each knob's share of its kind's measured uniform change: its layers' MACs over all layers the
    # uniform plan changed (pruning a group thins its members' outputs and their consumers' inputs)
    macs = {l.name: l.macs for l in space.layers}
    members = {g.name: g.members for g in space.groups}

    def knob_macs(k: Any) -> float:
        return float(sum(macs.get(m, 0) for m in members.get(k.target, (k.target,))))

    kind_total: dict[tuple[str, float], float] = {}
    for k, c in todo:
        kind_total[(k.suffix, float(c))] = kind_total.get((k.suffix, float(c)), 0.0) + knob_macs(k)
    progress = Progress(len(todo), "knob values", stream=stream) if stream is not None else None
    effects: list[KnobEffect] = []
    broken: list[str] = []
    dense_params = _dense_params(space)
    for i, (k, c) in enumerate(todo):
        params = {**dense_params, k.param_name: c}
        plan = space.plan_from_params(params)
        try:
            realized = space.realize(model, plan, reduce_range=reduce_range)
            loss, acc = _loss_accuracy(realized, xs, ys)
            size = float(model_size_bytes(realized))
            if predicted and lm is not None:
                lat = float(lm.predict_module(realized, objective.workload.example_input)[0]) - dense_latency
            else:
                total = kind_total.get((k.suffix, float(c))) or 1.0
                lat = local.get((k.suffix, float(c)), 0.0) * knob_macs(k) / total
            if not math.isfinite(loss):
                raise FloatingPointError("the loss is not finite")
        except Exception as e:  # recorded and left out of the solve; the search goes on
            broken.append(f"{k.param_name}={_fmt(float(c))} ({type(e).__name__}: {str(e)[:80]})")
            effects.append(KnobEffect(k.param_name, k.target, k.suffix, float(c), math.nan, math.nan, 0.0, 0.0))
        else:
            effects.append(KnobEffect(k.param_name, k.target, k.suffix, float(c), loss - base_loss,
                                      100.0 * (base_acc - acc), size - dense_size, lat))
        if progress is not None:
            progress.update(i + 1, k.param_name)
    if broken:
        warnings.warn(f"sensitivity: {len(broken)} knob value(s) break the forward pass and are left out of the "
                      f"solve: {', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}", stacklevel=2)
    source = ("predicted by the device profile's latency model, per knob" if predicted else
              "uniform plans measured paired with dense, shared out by MACs" if measuring else "not an objective")
    profile = SensitivityProfile(space_key(space), len(xs), base_loss, base_acc, dense_size,
                                 dense_latency if math.isfinite(dense_latency) else 0.0, source, tuple(effects),
                                 time.perf_counter() - t0)
    say(f"sensitivity: {len(effects)} knob values on {len(xs)} training samples in {profile.seconds:.1f} s "
        f"(latency: {source})")
    return profile


def feature_of(kind: str, value: float) -> str:
    """The surrogate feature a knob value feeds: one per pruning and rank, one per bit-width
    (a fine-tune recovers 8-bit and 4-bit weights by very different amounts).

    Example:
        >>> feature_of("bits", 8.0), feature_of("sparsity", 0.5)
        ('bits8', 'sparsity')
    """
    return f"bits{int(value)}" if kind == "bits" else kind


@dataclasses.dataclass(frozen=True)
class Surrogate:
    """Predicted accuracy drop (pp) of a plan: ``sum(weights[feature] * loss increases of its
    knob values that feed that feature)`` (see :func:`feature_of`); size and latency changes
    add up per knob. A feature without a weight takes ``default``.

    Example:
        >>> s = Surrogate({"bits8": 2.0}, 0, None)
        >>> s.predict_features({"bits8": 0.5, "rank": 1.0})
        2.0
    """

    weights: dict[str, float]
    fitted_on: int
    spearman: float | None  # rank correlation with the measured drop on the trials it was fitted on
    default: float = 1.0

    def weight(self, feature: str) -> float:
        """The weight of ``feature`` (``default`` where no fitted trial used it)."""
        return self.weights.get(feature, self.default)

    def predict_features(self, features: Mapping[str, float]) -> float:
        """Predicted drop from per-feature summed loss increases."""
        return float(sum(self.weight(k) * v for k, v in features.items()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Surrogate:
        """Inverse of :meth:`to_dict` (extra keys, as the study's record has, are ignored)."""
        return cls(dict(data["weights"]), int(data["fitted_on"]), data.get("spearman"),
                   float(data.get("default", 1.0)))


def _effects_by_param(profile: SensitivityProfile) -> dict[tuple[str, float], KnobEffect]:
    return {(e.param, float(e.value)): e for e in profile.effects}


def plan_features(profile: SensitivityProfile, params: Mapping[str, Any]) -> dict[str, float]:
    """Per-feature sums of the loss increases (clipped at 0) of a plan's non-dense knob values;
    NaN where the plan uses a value whose forward pass broke.

    Example:
        >>> e = KnobEffect("a.bits", "a", "bits", 8, 0.5, 2.0, -10.0, -0.1)
        >>> plan_features(SensitivityProfile("k", 8, 0.5, 1.0, 10.0, 1.0, "t", (e,), 0.1), {"a.bits": 8})
        {'bits8': 0.5}
    """
    by = _effects_by_param(profile)
    out: dict[str, float] = {}
    for name, value in params.items():
        e = by.get((name, float(value)))
        if e is not None:
            f = feature_of(e.kind, e.value)
            out[f] = out.get(f, 0.0) + (max(e.loss_delta, 0.0) if math.isfinite(e.loss_delta) else math.nan)
    return out


def _scored_rows(profile: SensitivityProfile, study: optuna.Study) -> list[tuple[dict[str, float], float]]:
    """(plan features, measured drop vs dense in pp) of every completed non-dense trial whose
    plan uses no broken knob value; empty without a completed dense baseline or accuracy."""
    names = list(study.metric_names or [])
    if "accuracy" not in names:
        return []
    i = names.index("accuracy")
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    dense = [t for t in done if t.user_attrs.get("preset") == "dense"]
    if not dense:
        return []
    base = dense[0].values[i]
    rows = []
    for t in done:
        if t.user_attrs.get("preset") == "dense":
            continue
        f = plan_features(profile, t.params)
        if all(math.isfinite(v) for v in f.values()):
            rows.append((f, 100.0 * (base - t.values[i])))
    return rows


def _spearman(x: Sequence[float], y: Sequence[float], least: int = 3) -> float | None:
    """Spearman's rank correlation, or None where it is undefined or too thin (fewer than
    ``least`` points, a constant side)."""
    from scipy.stats import spearmanr

    if len(x) < least or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    rho = spearmanr(x, y).statistic
    return float(rho) if math.isfinite(rho) else None


def fit_surrogate(profile: SensitivityProfile, study: optuna.Study) -> Surrogate:
    """Fit one weight per feature on the study's completed trials (non-negative least squares
    on the measured drop vs dense). A feature no fitted trial used takes the largest fitted
    weight (the cautious guess: it recovers no better than the worst kind seen); unit weights
    before any trial completes.

    Example:
        >>> s = fit_surrogate(SensitivityProfile("k", 8, 0.5, 1.0, 10.0, 1.0, "t", (), 0.1),
        ...                   optuna.create_study(directions=["maximize"]))
        >>> s.weights, s.fitted_on, s.default
        ({}, 0, 1.0)
    """
    from scipy.optimize import nnls

    rows = _scored_rows(profile, study)
    feats = [f for f, _ in rows]
    drops = [max(drop, 0.0) for _, drop in rows]
    names = sorted({k for f in feats for k, v in f.items() if v > 0})
    if len(feats) < 2 or not names:
        return Surrogate({}, len(feats), None)
    a = np.array([[f.get(n, 0.0) for n in names] for f in feats])
    b = np.array(drops)
    w, _ = nnls(a, b)
    weights = {n: float(v) for n, v in zip(names, w)}
    return Surrogate(weights, len(feats), _spearman(list(a @ w), drops, least=2),
                     default=max(weights.values()) if any(weights.values()) else 1.0)


@dataclasses.dataclass(frozen=True)
class Proposal:
    """One solved plan: its Optuna params and what the surrogate predicts for it."""

    params: dict[str, Any]
    predicted_drop_pp: float
    predicted_size_bytes: float
    predicted_latency_ms: float
    budget: str


def solve_front(profile: SensitivityProfile, surrogate: Surrogate, space: CompressionSpace,
                size_grid: Sequence[float] = SIZE_GRID, latency_grid: Sequence[float] = LATENCY_GRID,
                log: Callable[[str], None] | None = None,
                size_of: Callable[[Plan], float] | None = None) -> list[Proposal]:
    """Minimum predicted drop under each (size, latency) budget of the grid: a multiple-choice
    knapsack (one value per knob) solved with ``scipy.optimize.milp``. Budgets are fractions of
    the largest saving the additive model sees (sizes and latencies add up per knob, which
    double counts where knobs overlap: pruning a layer and lowering its bits); the cells without
    a feasible plan are skipped and counted in one line. ``size_of`` gives each solved plan's
    exact size (the realized model's), else the additive estimate is kept. Returns distinct,
    non-dense plans, smallest first.

    Example:
        >>> from torch import nn
        >>> s = CompressionSpace.build(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.zeros(1, 4))
        >>> e = [KnobEffect(k.param_name, k.target, k.suffix, float(c), 0.1, 1.0, -10.0, -0.01)
        ...      for k in s.knobs if len(k.choices) > 1 for c in k.choices if float(c) != DENSE_VALUE[k.suffix]]
        >>> p = SensitivityProfile(space_key(s), 8, 0.5, 1.0, 100.0, 1.0, "t", tuple(e), 0.1)
        >>> len(solve_front(p, Surrogate({}, 0, None), s)) > 0
        True
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    say = log or (lambda msg: None)
    if profile.space_key != space_key(space):
        raise SpecError("the sensitivity profile was measured on another space; recompute it for this one")
    by = _effects_by_param(profile)
    knobs = [k for k in space.knobs if len(k.choices) > 1]
    columns: list[tuple[int, Any]] = []  # (knob index, value)
    cost, size, lat, upper = [], [], [], []
    for ki, k in enumerate(knobs):
        for c in k.choices:
            e = by.get((k.param_name, float(c)))
            dense_value = float(c) == DENSE_VALUE[k.suffix]
            ok = dense_value or (e is not None and math.isfinite(e.loss_delta))
            columns.append((ki, c))
            cost.append(0.0 if dense_value or not ok
                        else surrogate.weight(feature_of(k.suffix, float(c))) * max(e.loss_delta, 0.0))
            size.append(0.0 if dense_value or not ok else e.size_delta)
            lat.append(0.0 if dense_value or not ok else e.latency_delta_ms)
            upper.append(1.0 if ok else 0.0)
    n = len(columns)
    if n == 0:
        return []
    pick_one = np.zeros((len(knobs), n))
    for j, (ki, _) in enumerate(columns):
        pick_one[ki, j] = 1.0
    size_a, lat_a, cost_a = np.array(size), np.array(lat), np.array(cost)
    # the largest saving each axis allows: every knob at its most saving allowed value
    def best(arr: np.ndarray) -> float:
        return float(sum(min((arr[j] for j, (ki, _) in enumerate(columns) if ki == i and upper[j] > 0), default=0.0)
                         for i in range(len(knobs))))

    size_min, lat_min = best(size_a), best(lat_a)
    lat_fracs: list[float | None] = list(latency_grid) if lat_min < 0 else [None]
    # a tiny tie-break towards smaller plans: among equal predicted drops prefer the one that saves more
    tiebreak = 1e-9 * size_a / (abs(size_min) or 1.0)
    proposals: dict[str, Proposal] = {}
    infeasible: list[str] = []
    for sf in size_grid:
        for lf in lat_fracs:
            cons = [LinearConstraint(pick_one, 1, 1), LinearConstraint(size_a[None, :], -np.inf, sf * size_min)]
            if lf is not None:
                cons.append(LinearConstraint(lat_a[None, :], -np.inf, lf * lat_min))
            res = milp(cost_a + tiebreak, constraints=cons, integrality=np.ones(n),
                       bounds=Bounds(np.zeros(n), np.array(upper)), options={"time_limit": 10})
            # budgets in the surrogate's own additive units: a fraction of the largest saving it sees
            label = f"size saving >= {sf:.0%}" + (f", latency saving >= {lf:.0%}" if lf is not None else "")
            if res.x is None:
                infeasible.append(label)
                continue
            params = {knobs[ki].param_name: c for j, (ki, c) in enumerate(columns) if res.x[j] > 0.5}
            key = json.dumps(params, sort_keys=True, default=float)
            plan = space.plan_from_params(params)
            if key in proposals or is_dense(plan):
                continue
            x = res.x > 0.5
            exact = size_of(plan) if size_of is not None else profile.dense_size + float(size_a[x].sum())
            proposals[key] = Proposal(params, float(cost_a[x].sum()), float(exact),
                                      profile.dense_latency_ms + float(lat_a[x].sum()), label)
    if infeasible:
        say(f"surrogate: {len(infeasible)} of {len(size_grid) * len(lat_fracs)} budgets have no plan within them "
            f"(e.g. {infeasible[-1]} of the largest saving); skipped")
    return sorted(proposals.values(), key=lambda p: (p.predicted_size_bytes, p.predicted_drop_pp))


@dataclasses.dataclass(frozen=True)
class SeedResult:
    """What :func:`seed_study` did: the profile, the fitted surrogate and the enqueued plans."""

    profile: SensitivityProfile
    surrogate: Surrogate
    proposals: tuple[Proposal, ...]
    enqueued: int
    solve_seconds: float


def load_profile(study: optuna.Study, space: CompressionSpace) -> SensitivityProfile | None:
    """The profile stored on ``study`` for this space, if any."""
    data = study.user_attrs.get(f"{ATTR}:{space_key(space)}")
    return SensitivityProfile.from_dict(data) if data else None


def _spread(items: list[Proposal], n: int) -> list[Proposal]:
    if len(items) <= n:
        return items
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)}) if n > 1 else [0]
    return [items[i] for i in idx]


def seed_study(study: optuna.Study, objective: CompressionObjective, *, n_plans: int = 8, samples: int = 256,
               log: Callable[[str], None] | None = None, stream: Any = None) -> SeedResult:
    """Sensitivity (stored on ``study``, reused when present), surrogate fitted on the study's
    completed trials, front solved on a budget grid; up to ``n_plans`` solved plans no trial
    has tried yet are enqueued with ``proposed_by="surrogate"`` and their predictions. The
    study's own sampler continues after them: a seeding step for any Optuna sampler.

    Example:
        >>> from edgeslim.search import DigitsCNN, digits_splits
        >>> from edgeslim.objectives import FinetuneConfig
        >>> data, _ = digits_splits(8, 0.3, seed=0)
        >>> obj = CompressionObjective(DigitsCNN(), torch.zeros(1, 1, 8, 8), data.train, data.val,
        ...                            objectives=["accuracy", "size_bytes"], finetune=FinetuneConfig(steps=0))
        >>> study = optuna.create_study(directions=obj.directions)
        >>> obj.enqueue_baselines(study)
        >>> study.optimize(obj, n_trials=3)
        >>> seed_study(study, obj, n_plans=2, samples=64).enqueued
        2
    """
    if n_plans < 1:
        raise SpecError(f"n_plans must be >= 1, got {n_plans!r}; the seeding step enqueues that many solved plans")
    say = log or (lambda msg: None)
    profile = load_profile(study, objective.space)
    if profile is None:
        profile = sensitivity_profile(objective, samples, log=say, stream=stream)
        study.set_user_attr(f"{ATTR}:{profile.space_key}", profile.to_dict())
    else:
        say(f"sensitivity: reused the profile stored on study {study.study_name!r} ({len(profile.effects)} values)")
    t0 = time.perf_counter()
    surrogate = fit_surrogate(profile, study)
    space, model = objective.space, objective.workload.model
    reduce_range = objective.device.int8_reduce_range
    proposals = solve_front(profile, surrogate, space, log=say,
                            size_of=lambda plan: float(model_size_bytes(space.realize(model, plan, reduce_range))))
    solve_s = time.perf_counter() - t0
    # a waiting trial has no params yet: Optuna keeps an enqueued trial's in its fixed_params
    tried = {json.dumps(t.params or t.system_attrs.get("fixed_params", {}), sort_keys=True, default=float)
             for t in study.get_trials(deepcopy=False)}
    fresh = [p for p in proposals if json.dumps(p.params, sort_keys=True, default=float) not in tried]
    chosen = _spread(fresh, n_plans)
    for p in chosen:
        study.enqueue_trial(p.params, user_attrs={
            "proposed_by": "surrogate", "predicted_drop_pp": round(p.predicted_drop_pp, 4),
            "predicted_size_bytes": round(p.predicted_size_bytes, 1),
            "predicted_latency_ms": round(p.predicted_latency_ms, 6), "budget": p.budget},
            skip_if_exists=True)  # a plan already waiting (enqueued by another worker) is not added twice
    study.set_user_attr("surrogate", {**surrogate.to_dict(), "proposed": len(proposals), "enqueued": len(chosen),
                                      "solve_seconds": round(solve_s, 3), "space_key": profile.space_key})
    say(f"surrogate: weights per nat of loss {', '.join(f'{k} {v:.3g}' for k, v in surrogate.weights.items())} "
        f"(fitted on {surrogate.fitted_on} trials"
        + (f", Spearman {surrogate.spearman:.2f}" if surrogate.spearman is not None else "")
        + f"); MILP solved {len(proposals)} distinct plans in {solve_s:.2f} s, enqueued {len(chosen)}")
    return SeedResult(profile, surrogate, tuple(proposals), len(chosen), solve_s)


def surrogate_quality(study: optuna.Study, space: CompressionSpace,
                      front_trials: Sequence[int] = ()) -> dict[str, Any] | None:
    """How good the surrogate was over every completed trial: Spearman rank correlation of
    predicted and measured drop, the trials it was scored on, and how many of ``front_trials``
    the solve proposed. None when the study holds no profile for this space."""
    profile = load_profile(study, space)
    stored = study.user_attrs.get("surrogate")
    if profile is None or not stored:
        return None
    surrogate = Surrogate.from_dict(stored)
    rows = _scored_rows(profile, study)
    pred = [surrogate.predict_features(f) for f, _ in rows]
    proposed = {t.number for t in study.get_trials(deepcopy=False) if t.user_attrs.get("proposed_by") == "surrogate"}
    return {"spearman": _spearman(pred, [drop for _, drop in rows]), "trials": len(pred),
            "proposed": len(proposed), "front": len(front_trials),
            "front_proposed": len(set(front_trials) & proposed), "weights": surrogate.weights,
            "sensitivity_seconds": profile.seconds}


class ReseedCallback:
    """An Optuna callback that solves the front again as trials arrive: once no enqueued trial
    is waiting and ``every`` trials have completed since the last solve, the surrogate is
    refitted on all completed trials (pruning and quantization interact; the presets alone do
    not show it) and up to ``n_plans`` new solved plans are enqueued. ``stop_at`` (a total
    trial count) keeps it from enqueuing past the run's budget.

    Example:
        >>> cb = ReseedCallback(None, every=6, n_plans=4, stop_at=50)  # doctest: +SKIP
        >>> study.optimize(objective, n_trials=36, callbacks=[cb])  # doctest: +SKIP
    """

    def __init__(self, objective: CompressionObjective, every: int = 6, n_plans: int = 4,
                 stop_at: int | None = None, log: Callable[[str], None] | None = None) -> None:
        self.objective = objective
        self.every = every
        self.n_plans = n_plans
        self.stop_at = stop_at
        self.log = log
        self.rounds = 0
        self._since = 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._since += 1
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials) or self._since < self.every:
            return
        room = self.n_plans if self.stop_at is None else min(self.n_plans, self.stop_at - len(trials))
        if room < 1:
            return
        self._since = 0
        self.rounds += 1
        seed_study(study, self.objective, n_plans=room, log=self.log)


def optimize_seeded(study: optuna.Study, objective: CompressionObjective, n_trials: int, *,
                    callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = (),
                    log: Callable[[str], None] | None = None, stream: Any = None,
                    lock: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                    stopped: Callable[[], bool] = lambda: False) -> None:
    """``study.optimize`` for ``n_trials`` trials, sensitivity-seeded: on a study not seeded
    yet the waiting presets run first, then :func:`seed_study` enqueues up to ``SEED_PLANS``
    solved plans; a :class:`ReseedCallback` solves again as trials arrive. Never enqueues past
    this call's budget. A trial that raises is recorded and the study goes on
    (``catch=(Exception,)``), as in the CLI. With several workers on one study, ``lock`` (a
    study-wide lock, :func:`edgeslim.search._storage.study_lock`) makes the seeding happen once;
    ``stopped`` (a signal came) ends the run between its phases.

    Example:
        >>> optimize_seeded(study, objective, 30)  # doctest: +SKIP
    """
    left = n_trials
    if not study.user_attrs.get("surrogate"):
        waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        first = min(waiting, left)  # the presets: the surrogate is fitted on them
        study.optimize(objective, n_trials=first, catch=(Exception,), callbacks=list(callbacks))
        left -= first
        if left > 0 and not stopped():
            with lock():  # another worker may have seeded the study meanwhile
                if not study.user_attrs.get("surrogate"):
                    seed_study(study, objective, n_plans=min(SEED_PLANS, left), log=log, stream=stream)
    if left <= 0 or stopped():
        return
    done_before = len([t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING])
    reseed = ReseedCallback(objective, every=RESEED_EVERY, n_plans=RESEED_PLANS, stop_at=done_before + left, log=log)
    study.optimize(objective, n_trials=left, catch=(Exception,), callbacks=[*callbacks, reseed])

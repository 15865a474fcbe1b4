"""Kernel-level latency model: one regressor per kernel type, fitted to a device's measurements.

Each kernel type (``conv_kxk@8``, ``gemm@32``, ...) gets a ridge regression of log latency on
the kernel's features (it extrapolates sanely from few points), plus, where there are enough
measurements, gradient-boosted trees on its residuals (scikit-learn fits them; they are stored
as plain arrays and evaluated with numpy, so a profile is JSON and prediction needs no sklearn).
A kernel's time is its micro-model's latency less the per-inference overhead (fixed cost plus
input/output binding, fitted on Identity models of several sizes), so that overhead is not
counted once per kernel. A candidate's p50 is the overhead for its own input/output plus the
sum of its kernels' predicted times; its p95 adds each part's own tail (p95 - p50, from the
measured p95/p50 ratio of its type), combined as far as measured networks show the parts' slow
runs coincide (``tail_mix_``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgeslim.objectives.devices._kernels import (KERNEL_FEATURES, Edge, Kernel, boundary_name, kernel_domain,
                                          kernel_matrix, kernel_type)
from edgeslim.objectives.devices._layout import Layout
from edgeslim.spaces import ObjectiveError

__all__ = ["BOUNDARY_CLASSES", "KERNEL_DOMAINS", "LatencyModel", "TreeEnsemble", "boundary_terms", "domain_counts"]

MIN_KERNEL_MS = 1e-4
BOUNDARY_CLASSES = ("q>q", "q>q+act", "q>c", "q>f", "c>q", "f>q", "c>c", "c>f", "f>c", "f>f",
                    "c>a", "q>a", "f>a", "a>c", "a>q", "a>f", "a>a")
# where a boundary's saving grows with the tensor crossing it: layout reorders inside an NCHWc
# chain and an Add folded into the conv before it; elsewhere it is a fixed per-node saving
PER_MB_CLASSES = frozenset({"c>c", "c>a"})
# the sides of a boundary (see kernel_domain): each kernel of a network pays an in-network cost
# per domain that lone micro-models cannot show (their per-node dispatch is inside the measured
# per-inference overhead); fitted, either sign, from chains and whole networks
KERNEL_DOMAINS = ("q", "c", "f", "a")


def boundary_terms(kernels: Sequence[Kernel], edges: Sequence[Edge], layout: Layout | int) -> np.ndarray:
    """Per boundary class: how many edges of that class, and (for ``PER_MB_CLASSES``) the MB of
    float tensor they carry. ``layout``: the device's blocked-layout rules (see :func:`kernel_domain`).

    Example:
        >>> k = Kernel("conv", 32, cin=16, cout=16, k=3, h=8, w=8, ho=8, wo=8)
        >>> i = 2 * BOUNDARY_CLASSES.index("c>c")
        >>> boundary_terms([k, k], [(0, 1, True)], 8)[i:i + 2].tolist()  # 1 edge, 4 KiB
        [1.0, 0.004096]
    """
    return _network_terms(kernels, edges, layout)[0]


def domain_counts(kernels: Sequence[Kernel], edges: Sequence[Edge], layout: Layout | int) -> np.ndarray:
    """How many of ``kernels`` stand in each of :data:`KERNEL_DOMAINS` (max pools between two
    int8 convs count as ``q``, as in :func:`boundary_terms`).

    Example:
        >>> q = Kernel("conv", 8, cin=16, cout=16, k=3, h=8, w=8, ho=8, wo=8)
        >>> domain_counts([q, q, Kernel("gemm", 32, cin=16, cout=4)], [(0, 1, True), (1, 2, False)], 16).tolist()
        [2.0, 0.0, 1.0, 0.0]
    """
    return _network_terms(kernels, edges, layout)[1]


def _network_terms(kernels: Sequence[Kernel], edges: Sequence[Edge], layout: Layout | int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`boundary_terms` and :func:`domain_counts` from one pass over the kernels' domains
    (a prediction needs both)."""
    row = [0.0] * (2 * len(BOUNDARY_CLASSES))  # a list: scalar updates of a numpy array cost more
    outs = [kernel_domain(k, layout) for k in kernels]
    ins = [kernel_domain(k, layout, "in") for k in kernels]
    if any(k.op == "pool" for k in kernels):
        _quantized_pools(kernels, edges, outs)
        _quantized_pools(kernels, edges, ins)
    index = _CLASS_INDEX
    for a, b, act in edges:
        c, per_mb = index[outs[a], ins[b], act]
        row[2 * c] += 1.0
        if per_mb:
            k = kernels[a]
            row[2 * c + 1] += k.cout * k.ho * k.wo * 4e-6
    return np.array(row), np.array([float(outs.count(d)) for d in KERNEL_DOMAINS])


def _quantized_pools(kernels: Sequence[Kernel], edges: Sequence[Edge], domains: list[str]) -> None:
    """Put on the ``q`` side the max pools that export leaves quantized: those with int8 convs on
    both sides, which ONNX Runtime runs as its NHWC uint8 pool between the two QLinearConvs (see
    ``keep_pools_float``); every other pool runs float."""
    def int8_conv(i: int) -> bool:
        return kernels[i].op == "conv" and kernels[i].bits == 8

    for i, k in enumerate(kernels):
        if k.op == "pool":
            ins = [a for a, b, _ in edges if b == i]
            outs = [b for a, b, _ in edges if a == i]
            if len(ins) == len(outs) == 1 and int8_conv(ins[0]) and int8_conv(outs[0]):
                domains[i] = "q"


_CLASS_INDEX = {  # (producer domain, consumer domain, act) -> (class index, per-MB term)
    (a, b, act): (BOUNDARY_CLASSES.index(boundary_name(a, b, act)), boundary_name(a, b, act) in PER_MB_CLASSES)
    for a in "qcaf" for b in "qcaf" for act in (False, True)
}


@dataclasses.dataclass
class TreeEnsemble:
    """Boosted regression trees as padded arrays: evaluated for all trees and rows at once.

    Leaves point to themselves, so ``depth`` fixed steps reach every leaf.

    Example:
        >>> t = TreeEnsemble.constant(0.5)
        >>> t.predict(np.zeros((2, 3))).tolist()
        [0.5, 0.5]
    """

    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    value: np.ndarray
    depth: int

    @classmethod
    def constant(cls, value: float) -> TreeEnsemble:
        """An ensemble that always predicts ``value``."""
        z = np.zeros((1, 1))
        return cls(z.astype(int), np.full((1, 1), np.inf), z.astype(int), z.astype(int), np.full((1, 1), value), 0)

    @classmethod
    def from_sklearn(cls, gbr: Any) -> TreeEnsemble:
        """Convert a fitted ``GradientBoostingRegressor`` (its learning rate folded into the leaves)."""
        trees = [est[0].tree_ for est in gbr.estimators_]
        m = max(t.node_count for t in trees)
        n = len(trees)
        feature = np.zeros((n, m), dtype=np.int64)
        threshold = np.full((n, m), np.inf)
        idx = np.arange(m)
        left = np.tile(idx, (n, 1))
        right = np.tile(idx, (n, 1))
        value = np.zeros((n, m))
        for i, t in enumerate(trees):
            c = t.node_count
            internal = t.children_left[:c] >= 0
            feature[i, :c] = np.where(internal, t.feature[:c], 0)
            threshold[i, :c] = np.where(internal, t.threshold[:c], np.inf)
            left[i, :c] = np.where(internal, t.children_left[:c], idx[:c])
            right[i, :c] = np.where(internal, t.children_right[:c], idx[:c])
            value[i, :c] = t.value[:c, 0, 0] * gbr.learning_rate
        return cls(feature, threshold, left, right, value, int(max(t.max_depth for t in trees)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Sum of the trees' leaf values for each row of ``x``."""
        return _walk(_stack_trees([self]), np.zeros(len(x), dtype=np.int64), x)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (infinite thresholds of leaves stored as null)."""
        thr = [[None if math.isinf(v) else float(v) for v in row] for row in self.threshold]
        return {"feature": self.feature.tolist(), "threshold": thr, "left": self.left.tolist(),
                "right": self.right.tolist(), "value": self.value.tolist(), "depth": self.depth}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TreeEnsemble:
        """Inverse of ``to_dict``."""
        thr = np.array([[np.inf if v is None else v for v in row] for row in d["threshold"]], dtype=float)
        return cls(np.array(d["feature"], dtype=np.int64), thr, np.array(d["left"], dtype=np.int64),
                   np.array(d["right"], dtype=np.int64), np.array(d["value"], dtype=float), int(d["depth"]))


@dataclasses.dataclass
class _TypeModel:
    coef: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    intercept: float
    trees: TreeEnsemble | None
    p95_ratio: float
    n: int
    lin: np.ndarray | None = None  # ms per unit of each linear term (None: pure log-space model)

    def predict_log(self, x: np.ndarray, terms: np.ndarray) -> np.ndarray:
        return _eval_log(_stack_models([self]), np.zeros(len(x), dtype=np.int64), x, terms)


def _stack_trees(ensembles: Sequence[TreeEnsemble | None]) -> dict[str, Any]:
    """Ensembles (None: no trees) padded into one flat set of arrays; leaves and padding point to
    themselves and add zero. Children are global flat indices, left then right, so each tree
    level costs one take for all trees and rows."""
    present = [e for e in ensembles if e is not None]
    n_trees = max([e.feature.shape[0] for e in present] + [1])
    width = max([e.feature.shape[1] for e in present] + [1])
    shape = (len(ensembles), n_trees, width)
    feature = np.zeros(shape, dtype=np.int64)
    threshold = np.full(shape, np.inf)
    left = np.broadcast_to(np.arange(width), shape).copy()
    right, value = left.copy(), np.zeros(shape)
    for i, e in enumerate(ensembles):
        if e is None:
            continue
        t, w = e.feature.shape
        feature[i, :t, :w], threshold[i, :t, :w] = e.feature, e.threshold
        left[i, :t, :w], right[i, :t, :w], value[i, :t, :w] = e.left, e.right, e.value
    child = np.stack([left, right], axis=-1).reshape(-1, width, 2) + \
        (np.arange(len(ensembles) * n_trees) * width)[:, None, None]
    return {"feature": feature.ravel(), "threshold": threshold.ravel(), "child": child.ravel(),
            "value": value.ravel(), "n_trees": n_trees, "width": width,
            "depth": max([e.depth for e in present] + [0])}


def _walk(st: Mapping[str, Any], ti: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Sum of the leaf values of ensemble ``ti[r]``'s trees for each row ``r`` of ``x``."""
    n, n_feat, width = x.shape[0], x.shape[1], st["width"]
    flat = (ti[None, :] * st["n_trees"] + np.arange(st["n_trees"])[:, None]) * width
    row = (np.arange(n) * n_feat)[None, :]
    xs, feature, threshold, child = x.ravel(), st["feature"], st["threshold"], st["child"]
    for _ in range(st["depth"]):
        go_right = xs.take(row + feature.take(flat)) > threshold.take(flat)
        flat = child.take(2 * flat + go_right)
    return st["value"].take(flat).sum(axis=0)


def _stack_models(models: Sequence[_TypeModel]) -> dict[str, Any]:
    """Several types' regressors in one set of padded arrays, evaluated together by :func:`_eval_log`."""
    n, n_feat = len(models), len(KERNEL_FEATURES)
    return {
        "coef": np.array([m.coef for m in models]).reshape(n, n_feat),
        "mean": np.array([m.mean for m in models]).reshape(n, n_feat),
        "scale": np.array([m.scale for m in models]).reshape(n, n_feat),
        "intercept": np.array([m.intercept for m in models]),
        "lin": np.array([m.lin if m.lin is not None else np.zeros(5) for m in models]),
        "has_lin": np.array([m.lin is not None for m in models]),
        "p95": np.array([m.p95_ratio for m in models]),
        **_stack_trees([m.trees for m in models]),
    }


def _eval_log(st: Mapping[str, Any], ti: np.ndarray, x: np.ndarray, terms: np.ndarray) -> np.ndarray:
    """Log kernel time of each row ``r`` of ``x`` (work ``terms``) under stacked model ``ti[r]``."""
    z = (x - st["mean"][ti]) / st["scale"][ti]
    log_t = (z * st["coef"][ti]).sum(axis=1) + st["intercept"][ti]
    work = (terms * st["lin"][ti]).sum(axis=1)
    log_t = log_t + np.where(st["has_lin"][ti], np.log(np.maximum(work, MIN_KERNEL_MS)), 0.0)
    return log_t + _walk(st, ti, x)


class LatencyModel:
    """Predicts batch-1 latency of a kernel list on one device (scikit-learn estimator style).

    ``fit(kernels, p50_ms, p95_ms, overhead_ms)`` learns; learned attributes end in ``_``;
    ``predict(kernels)`` refuses to run unfitted and raises for kernel types it never saw.

    Example:
        >>> ks = [Kernel("gemm", 32, cin=c, cout=c) for c in (8, 16, 32, 64, 128, 256)]
        >>> io = [Kernel("io", cin=n) for n in (1, 1000)]
        >>> ms = [{"p50_ms": 0.01 + 1e-6 * k.cin * 8, "p95_ms": 0.012, "io_bytes": k.cin * 8} for k in io]
        >>> ms += [{"p50_ms": 0.01 + 1e-5 * k.macs, "p95_ms": 0.012 + 1.2e-5 * k.macs, "io_bytes": 0} for k in ks]
        >>> m = LatencyModel(device="toy").fit(io + ks, ms)
        >>> round(m.predict([Kernel("gemm", 32, cin=64, cout=64)])[0], 3)
        0.051
    """

    def __init__(self, device: str = "", ridge: float = 1e-3, min_tree_points: int = 40,
                 n_estimators: int = 150, max_depth: int = 3, learning_rate: float = 0.1, seed: int = 0,
                 layout: Layout | None = None) -> None:
        self.device = device
        # the device's blocked-layout rules (probed at calibration): which kernels chain in the
        # NCHWc layout, so which boundary class each edge belongs to
        self.layout = layout if layout is not None else Layout(1)
        self.ridge = ridge
        self.min_tree_points = min_tree_points
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.seed = seed

    def fit(self, kernels: Sequence[Kernel], measurements: Sequence[Mapping[str, float]],
            select: bool = False) -> LatencyModel:
        """Fit from micro-model measurements; returns ``self``.

        Each measurement has end-to-end ``p50_ms``/``p95_ms`` and ``io_bytes`` (graph inputs
        plus outputs). Kernels of op ``io`` are Identity models of several sizes: they fit the
        per-inference overhead as a function of ``io_bytes`` (session dispatch, binding inputs,
        copying outputs out; interpolated on a log scale) that every single-kernel model pays once, and a whole network pays once
        too. The other kernels' regressors learn ``log(p50 - overhead)``: a non-negative sum of
        work terms (fixed cost, MACs, bytes in, out and of weights; costs per unit fitted by
        relative non-negative least squares) corrected by ridge and boosted trees on the log
        residual. With ``select`` each type's configuration (with or without the work terms,
        how many trees) is chosen by 5-fold cross-validation; otherwise the default is used.
        """
        io = [m for k, m in zip(kernels, measurements) if k.op == "io"]
        # binding cost is not linear in size (cache effects): keep the measured curve, sorted; a
        # size timed several times over a calibration contributes its median
        by_size: dict[float, list[float]] = {}
        for m in io:
            by_size.setdefault(float(m["io_bytes"]), []).append(float(m["p50_ms"]))
        if len(by_size) < 2:
            raise ValueError("fit needs 'io' (Identity) measurements of at least two sizes to fit the overhead")
        self.overhead_ = [[b, float(np.median(v))] for b, v in sorted(by_size.items())]
        self.overhead_p95_ratio_ = float(np.median([m["p95_ms"] / m["p50_ms"] for m in io]))
        by_type: dict[str, list[int]] = {}
        for i, k in enumerate(kernels):
            if k.op != "io":
                by_type.setdefault(kernel_type(k), []).append(i)
        self.types_: dict[str, _TypeModel] = {}
        self.configs_: dict[str, tuple[bool, int, int]] = {}
        for t, idx in sorted(by_type.items()):
            x, terms = kernel_matrix([kernels[i] for i in idx])
            y = np.array([max(measurements[i]["p50_ms"] - self._io_cost(measurements[i]["io_bytes"]), MIN_KERNEL_MS)
                          for i in idx])
            ratio = float(np.median([measurements[i]["p95_ms"] / measurements[i]["p50_ms"] for i in idx]))
            config = self._select_config(x, np.log(y), terms) if select else self.CONFIGS[2]
            self.types_[t] = self._fit_type(x, np.log(y), ratio, terms, config)
            self.configs_[t] = config
        self._cache: dict[Kernel, tuple[float, float]] = {}
        self._stack = None
        self.boundaries_: np.ndarray | None = None
        self.kernel_costs_ = np.zeros(len(KERNEL_DOMAINS))
        self.tail_mix_ = 1.0
        return self

    def overhead_ms(self, io_bytes: float) -> float:
        """Per-inference overhead (dispatch, binding input/output of ``io_bytes``) in ms."""
        return self._io_cost(io_bytes)

    def _io_cost(self, io_bytes: float) -> float:
        x = np.log2([p[0] + 1 for p in self.overhead_])
        y = [p[1] for p in self.overhead_]
        return float(np.interp(math.log2(io_bytes + 1), x, y))

    # (linear work terms as the base, boosted trees, tree depth): candidates cross-validation picks from
    CONFIGS: tuple[tuple[bool, int, int], ...] = ((True, 0, 0), (True, 60, 2), (True, 150, 3), (False, 150, 3),
                                                  (False, 60, 2))

    def _fit_type(self, x: np.ndarray, y: np.ndarray, ratio: float, terms: np.ndarray,
                  config: tuple[bool, int, int] | None = None) -> _TypeModel:
        use_lin, n_estimators, max_depth = config or (False, self.n_estimators, self.max_depth)
        lin = None
        target = y
        if use_lin:
            from scipy.optimize import nnls

            # relative least squares (rows divided by the measured time), non-negative costs per unit
            a = terms / np.exp(y)[:, None]
            col = np.maximum(np.abs(a).max(axis=0), 1e-30)
            c, _ = nnls(a / col, np.ones(len(y)))
            lin = c / col
            target = y - np.log(np.maximum(terms @ lin, MIN_KERNEL_MS))
        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale = np.where(scale > 1e-9, scale, 1.0)
        z = (x - mean) / scale
        intercept = float(target.mean())
        a = z.T @ z + self.ridge * len(y) * np.eye(z.shape[1])
        coef = np.linalg.solve(a, z.T @ (target - intercept))
        trees = None
        if n_estimators and len(y) >= self.min_tree_points:
            from sklearn.ensemble import GradientBoostingRegressor

            resid = target - (z @ coef + intercept)
            gbr = GradientBoostingRegressor(n_estimators=n_estimators, max_depth=max_depth,
                                            learning_rate=self.learning_rate, subsample=0.8,
                                            random_state=self.seed).fit(x, resid)
            trees = TreeEnsemble.from_sklearn(gbr)
            # the ensemble's starting value (the residuals' mean) rides on every leaf of tree 0
            trees.value[0] += float(np.ravel(getattr(gbr.init_, "constant_", [0.0]))[0])
        return _TypeModel(coef, mean, scale, intercept, trees, ratio, len(y), lin)

    def _select_config(self, x: np.ndarray, y: np.ndarray, terms: np.ndarray, folds: int = 5) -> tuple[bool, int, int]:
        """The config with the lowest cross-validated mean relative error on this type's points."""
        rng = np.random.default_rng(self.seed)
        fold = rng.permutation(len(y)) % folds
        best, best_err = self.CONFIGS[0], math.inf
        for config in self.CONFIGS:
            errs = []
            for f in range(folds):
                tr, te = fold != f, fold == f
                m = self._fit_type(x[tr], y[tr], 1.0, terms[tr], config)
                errs.append(np.abs(np.exp(m.predict_log(x[te], terms[te]) - y[te]) - 1))
            err = float(np.concatenate(errs).mean())
            if err < best_err:
                best, best_err = config, err
        return best

    def _check(self) -> None:
        if not hasattr(self, "types_"):
            raise ObjectiveError("this LatencyModel is not fitted; call fit() or load a calibrated profile")

    def covers(self, kernel: Kernel) -> bool:
        """Whether the profile has a model for this kernel's type."""
        self._check()
        return kernel_type(kernel) in self.types_

    def predict_kernels(self, kernels: Sequence[Kernel]) -> list[tuple[float, float]]:
        """(p50, p95) in ms of each kernel, overhead excluded."""
        self._check()
        cache = self._cache
        out: list[tuple[float, float] | None] = [cache.get(k) for k in kernels]
        miss = [i for i, o in enumerate(out) if o is None]
        if miss:
            todo = [kernels[i] for i in miss]
            types = [kernel_type(k) for k in todo]
            for k, t in zip(todo, types):
                if t not in self.types_:
                    raise ObjectiveError(
                        f"layer {k.layer!r} runs a {t} kernel that device profile {self.device!r} does not "
                        f"cover (covered: {sorted(self.types_)}); re-run `edgeslim calibrate --device "
                        f"{self.device}` with --full, or freeze that layer's bits")
            # repeated blocks run identically shaped kernels: predict each shape once
            first: dict[tuple[Any, ...], int] = {}
            slot = [first.setdefault(k.shape, len(first)) for k in todo]
            uniq = sorted(first.values())
            p50, p95 = self._predict_rows([todo[slot.index(u)] for u in uniq], [types[slot.index(u)] for u in uniq])
            p50l, p95l = p50.tolist(), p95.tolist()
            for i, k, u in zip(miss, todo, slot):
                out[i] = cache[k] = (p50l[u], p95l[u])
        return out  # type: ignore[return-value]

    def _stacked(self) -> dict[str, Any]:
        """Every type's regressor in one set of padded arrays, so a candidate's kernels of all types
        are evaluated in a handful of numpy operations (prediction stays well under a millisecond)."""
        if getattr(self, "_stack", None) is None:
            names = sorted(self.types_)
            self._stack = {"index": {t: i for i, t in enumerate(names)},
                           **_stack_models([self.types_[t] for t in names])}
        return self._stack

    def _predict_rows(self, kernels: Sequence[Kernel], types: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        st = self._stacked()
        ti = np.array([st["index"][t] for t in types])
        x, terms = kernel_matrix(kernels)
        p50 = np.exp(_eval_log(st, ti, x, terms))
        return p50, p50 * st["p95"][ti]

    def predict(self, kernels: Sequence[Kernel], io_bytes: float = 0.0,
                edges: Sequence[Edge] | None = None) -> tuple[float, float]:
        """Predicted (p50, p95) latency in ms of one inference running ``kernels``.

        ``io_bytes`` is the size of the model's input plus output tensors. With ``edges`` (from
        :func:`extract_graph`) the fitted boundary terms correct for what connected kernels do
        differently from lone ones (layout reorders and quantize/dequantize pairs they share).
        """
        over, p50, tails = self._parts(kernels, io_bytes)
        p95 = p50 + self._tail(tails)
        coef = getattr(self, "boundaries_", None)
        if edges and coef is not None:
            terms, counts = _network_terms(kernels, edges, self.layout)
            saving = float(terms @ coef) - float(counts @ self.kernel_costs_)
            # never let the correction remove more than half the kernels' time (extrapolation guard)
            saving = min(saving, 0.5 * (p50 - over))
            p95, p50 = p95 * (p50 - saving) / p50, p50 - saving
        return p50, p95

    def _parts(self, kernels: Sequence[Kernel], io_bytes: float) -> tuple[float, float, list[float]]:
        """The overhead, the p50 before boundary corrections (overhead + kernels) and each part's
        tail, p95 - p50 (the kernels', then the overhead's)."""
        per = self.predict_kernels(kernels)
        over = self._io_cost(io_bytes)
        return over, over + sum(p for p, _ in per), [q - p for p, q in per] + [over * (self.overhead_p95_ratio_ - 1.0)]

    def _tail(self, tails: Sequence[float]) -> float:
        """How far an inference's p95 lies above its p50, from each part's own (p95 - p50): their
        sum when slow runs of all parts coincide (``tail_mix_`` 1), their root sum of squares
        when they are independent (0), and the fitted mix in between."""
        a = getattr(self, "tail_mix_", 1.0)
        linear = sum(tails)
        if a >= 1.0:
            return linear
        return a * linear + (1.0 - a) * math.sqrt(sum(t * t for t in tails))

    def fit_tail(self, chains: Sequence[tuple[Sequence[Kernel], float, float, float]]) -> LatencyModel:
        """Fit ``tail_mix_`` from measured chains or networks, each ``(kernels, p50_ms, p95_ms,
        io_bytes)``: the mix (0 to 1 in steps of 0.05) whose predicted p95/p50 ratios lie nearest
        the measured ones (mean absolute log ratio). Ratios, not times, so the kernel model's own
        p50 error does not leak in. Without chains the mix stays 1 (every part's tail added).

        On the development VM whole networks came out at 0.5 (their p95 lies 4-35 % above p50,
        where adding every kernel's tail said 20 %); short synthetic chains at 1.

        Example:
            >>> model.fit_tail([(kernels, 0.080, 0.092, 1024.0)]).tail_mix_  # doctest: +SKIP
            0.5
        """
        self._check()
        self.tail_mix_ = 1.0
        if not chains:
            return self
        parts = []
        for kernels, p50, p95, io in chains:
            _, raw, tails = self._parts(kernels, io)
            t = np.array(tails)
            parts.append((raw, float(t.sum()), float(np.sqrt((t * t).sum())), math.log(p95 / p50)))
        arr = np.array(parts)
        grid = np.linspace(0.0, 1.0, 21)
        errs = [np.abs(np.log1p((a * arr[:, 1] + (1 - a) * arr[:, 2]) / arr[:, 0]) - arr[:, 3]).mean()
                for a in grid]
        self.tail_mix_ = float(grid[int(np.argmin(errs))])
        return self

    def fit_boundaries(self, chains: Sequence[tuple[Sequence[Kernel], Sequence[Edge], float, float, float | None]],
                       ridge: float = 1e-4) -> LatencyModel:
        """Fit per-boundary-class savings (fixed + per MB) and per-domain in-network kernel costs
        from measured kernel chains and whole networks.

        Each chain is ``(kernels, edges, p50_ms, io_bytes, lone_ms)``: ``lone_ms`` is the sum of
        its kernels' measured lone times (overhead excluded), or None to use the model's
        predictions instead. The target is what the lone-kernel sum over-predicts, fitted by
        ridge least squares weighted for relative error: savings non-negative, the per-kernel
        costs (``kernel_costs_``, ms per kernel of each of :data:`KERNEL_DOMAINS`) of either sign.
        """
        self._check()
        self.kernel_costs_ = np.zeros(len(KERNEL_DOMAINS))
        if not chains:
            self.boundaries_ = None
            return self
        rows, target = [], []
        for kernels, edges, p50, io, lone_ms in chains:
            lone = self.predict(kernels, io)[0] if lone_ms is None else self._io_cost(io) + lone_ms
            terms, counts = _network_terms(kernels, edges, self.layout)
            # a cost is a negative saving; two columns (cost, refund) let non-negative least
            # squares give it either sign
            rows.append(np.concatenate([terms, -counts, counts]) / p50)
            target.append((lone - p50) / p50)
        from scipy.optimize import nnls

        a, y = np.array(rows), np.array(target)
        scale = np.maximum(np.abs(a).max(axis=0), 1e-12)
        z = a / scale
        # non-negative: a boundary never costs more than the lone kernels' own reorders,
        # quantize/dequantize and dispatch; ridge rows keep sparse classes near zero. Kept light:
        # chains have one edge fewer than kernels, so a heavier penalty shares a per-edge saving
        # out between edge and kernel terms (same predictions, meaningless terms)
        k = z.shape[1]
        coef, _ = nnls(np.vstack([z, math.sqrt(ridge * len(y)) * np.eye(k)]), np.concatenate([y, np.zeros(k)]))
        coef = coef / scale
        nb, nd = 2 * len(BOUNDARY_CLASSES), len(KERNEL_DOMAINS)
        self.boundaries_ = coef[:nb]
        self.kernel_costs_ = coef[nb:nb + nd] - coef[nb + nd:]
        return self

    def predict_module(self, module: Any, example_input: Any) -> tuple[float, float, int]:
        """(p50, p95, kernel count) of a realized module on ``example_input``: its kernels after
        fusion (torch.fx) plus the overhead for its input and output."""
        from edgeslim.objectives.devices._kernels import extract_graph, io_bytes

        kernels, edges = extract_graph(module, example_input)
        p50, p95 = self.predict(kernels, io_bytes(kernels, example_input), edges)
        return p50, p95, len(kernels)

    def to_dict(self) -> dict[str, Any]:
        """JSON form of the fitted model."""
        self._check()
        return {
            "features": list(KERNEL_FEATURES),
            "layout": self.layout.to_dict(),
            "overhead_ms": self.overhead_, "overhead_p95_ratio": self.overhead_p95_ratio_,
            "boundary_classes": list(BOUNDARY_CLASSES),
            "boundaries": None if getattr(self, "boundaries_", None) is None else self.boundaries_.tolist(),
            "kernel_domains": list(KERNEL_DOMAINS), "kernel_costs": self.kernel_costs_.tolist(),
            "tail_mix": getattr(self, "tail_mix_", 1.0),
            "types": {t: {"coef": m.coef.tolist(), "mean": m.mean.tolist(), "scale": m.scale.tolist(),
                          "intercept": m.intercept, "p95_ratio": m.p95_ratio, "n": m.n,
                          "work_terms": m.lin.tolist() if m.lin is not None else None,
                          "trees": m.trees.to_dict() if m.trees is not None else None}
                      for t, m in self.types_.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: str = "") -> LatencyModel:
        """Rebuild a fitted model from ``to_dict`` output."""
        if list(d["features"]) != list(KERNEL_FEATURES):
            raise ValueError(f"model.features {d['features']} differ from this version's {list(KERNEL_FEATURES)}")
        if not isinstance(d.get("layout"), dict):
            raise ValueError("model.layout is missing (a profile from an older edgeslim, fitted before the "
                             "blocked-layout rules were probed)")
        m = cls(device=device, layout=Layout.from_dict(d["layout"]))
        m.types_ = {
            t: _TypeModel(np.array(v["coef"], float), np.array(v["mean"], float), np.array(v["scale"], float),
                          float(v["intercept"]), TreeEnsemble.from_dict(v["trees"]) if v["trees"] else None,
                          float(v["p95_ratio"]), int(v["n"]),
                          np.array(v["work_terms"], float) if v.get("work_terms") is not None else None)
            for t, v in d["types"].items()
        }
        m.overhead_ = [[float(a), float(b)] for a, b in d["overhead_ms"]]
        if len(m.overhead_) < 2:
            raise ValueError("model.overhead_ms must hold at least two [io_bytes, ms] pairs")
        m.overhead_p95_ratio_ = float(d["overhead_p95_ratio"])
        b = d.get("boundaries")
        if b is not None and (list(d.get("boundary_classes", [])) != list(BOUNDARY_CLASSES) or len(b) != 2 * len(BOUNDARY_CLASSES)):
            raise ValueError(f"model.boundaries must hold 2 values for each of {list(BOUNDARY_CLASSES)}")
        m.boundaries_ = None if b is None else np.array(b, float)
        costs = d.get("kernel_costs")
        if costs is None:
            raise ValueError("model.kernel_costs is missing (a profile from an older edgeslim, fitted without "
                             "in-network kernel costs)")
        if list(d.get("kernel_domains", [])) != list(KERNEL_DOMAINS) or len(costs) != len(KERNEL_DOMAINS):
            raise ValueError(f"model.kernel_costs must hold one value for each of {list(KERNEL_DOMAINS)}")
        m.kernel_costs_ = np.array(costs, float)
        m.tail_mix_ = float(d.get("tail_mix", 1.0))  # profiles from before it was fitted: tails added
        if not 0.0 <= m.tail_mix_ <= 1.0:
            raise ValueError(f"model.tail_mix must lie between 0 and 1, not {m.tail_mix_}")
        m._cache = {}
        m._stack = None
        return m

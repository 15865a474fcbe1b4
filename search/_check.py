"""check-latency: how well a device profile predicts measured latency of real candidates."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.objectives import DeviceProfile, Kernel, build_artifact, measure_latency
from edgeslim.search._workloads import DigitsCNN, DigitsResNet
from edgeslim.spaces import CompressionSpace, RuleSet, SpecError, layer_bits

__all__ = ["CheckRow", "CheckSummary", "FOCUS_PLANS", "VALIDATION_WORKLOADS", "check_latency", "summarize",
           "workload_kernels"]

# random plans per target model whose kernels a focused calibration measures (beside the dense
# and uniform int8/int4 presets), by calibration mode
FOCUS_PLANS = {"quick": 6, "full": 20}
# plans for calibration are drawn from their own stream, never from check-latency's seeds
_FOCUS_SEED = 7919


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
    """One sampled candidate: predicted and measured p50 in ms."""

    workload: str
    plan: str
    predicted_ms: float
    measured_ms: float

    @property
    def error(self) -> float:
        """Signed relative error of the prediction."""
        return self.predicted_ms / self.measured_ms - 1.0


@dataclasses.dataclass(frozen=True)
class CheckSummary:
    """Share within ±10 %, MAPE, Spearman rank correlation, worst cases.

    Example:
        >>> s = summarize([CheckRow("w", "p", 1.0, 1.0), CheckRow("w", "q", 2.2, 2.0)])
        >>> s.within_10pct, round(s.mape, 3)
        (1.0, 0.05)
    """

    n: int
    within_10pct: float
    mape: float
    spearman: float
    worst: tuple[CheckRow, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"n": self.n, "within_10pct": self.within_10pct, "mape": self.mape, "spearman": self.spearman,
                "worst": [dict(dataclasses.asdict(r), error=r.error) for r in self.worst]}


def summarize(rows: Sequence[CheckRow], worst: int = 5) -> CheckSummary:
    """Aggregate rows into the figures check-latency prints."""
    from scipy.stats import spearmanr

    errs = np.array([abs(r.error) for r in rows])
    rho = float(spearmanr([r.predicted_ms for r in rows], [r.measured_ms for r in rows]).statistic) \
        if len(rows) > 2 else float("nan")
    order = sorted(rows, key=lambda r: -abs(r.error))[:worst]
    return CheckSummary(len(rows), float((errs <= 0.10).mean()), float(errs.mean()), rho, tuple(order))


def check_latency(profile: DeviceProfile, samples_per_workload: int, seed: int = 0,
                  workloads: Sequence[str] = tuple(VALIDATION_WORKLOADS),
                  progress: Callable[[int, int], None] | None = None,
                  threads: int | None = None) -> list[CheckRow]:
    """Sample random plans, predict with ``profile`` and measure the exported artifacts here.

    Measurement uses the profile's thread count unless ``threads`` says otherwise (to check
    that a profile is specific to its thread setting).
    """
    assert profile.latency_model is not None
    rng = np.random.default_rng(seed)
    rows: list[CheckRow] = []
    total = samples_per_workload * len(workloads)
    with tempfile.TemporaryDirectory(prefix="edgeslim-check-") as tmp:
        for w in workloads:
            factory, shape = VALIDATION_WORKLOADS[w]
            torch.manual_seed(seed)
            base = factory().eval()
            x = torch.randn(shape)
            space = CompressionSpace.build(base, x)
            dists = space.distributions()
            for i in range(samples_per_workload):
                params = {k: d.choices[int(rng.integers(len(d.choices)))] for k, d in dists.items()}
                plan = space.plan_from_params(params) if i else space.dense_plan()
                model = space.realize(base, plan, reduce_range=profile.int8_reduce_range)
                with torch.no_grad():
                    model(x)  # settle activation observers of quantized layers
                predicted, _, _ = profile.latency_model.predict_module(model, x)
                calib = [np.random.default_rng(j).standard_normal(shape).astype(np.float32) for j in range(4)]
                path, _, _ = build_artifact(model, x, layer_bits(model), calib, Path(tmp), stem=f"{w}-{i}")
                measured = measure_latency(path, shape, threads=threads or profile.threads, budget_s=0.5, min_runs=20).p50_ms
                rows.append(CheckRow(w, plan.summary(), predicted, measured))
                if progress:
                    progress(len(rows), total)
    return rows


def _focus_target(target: str) -> tuple[nn.Module, torch.Tensor, RuleSet | None]:
    """A built-in check workload by name, or the model, input and space rules of a study spec."""
    if target in VALIDATION_WORKLOADS:
        factory, shape = VALIDATION_WORKLOADS[target]
        torch.manual_seed(0)
        return factory().eval(), torch.randn(shape), None
    path = Path(target)
    if path.suffix == ".toml" and path.is_file():
        from edgeslim.search._spec import load_spec
        from edgeslim.search._workloads import _BUILTINS, _user_model

        spec = load_spec(path)
        torch.manual_seed(spec.seed)
        if spec.model.builtin:
            factory, size, _ = _BUILTINS[spec.model.builtin]
            model, shape = factory(), (1, 1, size, size)
        else:
            model, shape = _user_model(spec), (1, *spec.model.input_shape)
        return model.eval(), torch.randn(shape), spec.space.rule_set()
    raise SpecError(f"--for {target!r} is neither a built-in workload ({', '.join(VALIDATION_WORKLOADS)}) "
                    "nor a study spec .toml file; give one of those")


def workload_kernels(targets: Sequence[str], plans: int, seed: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> list[Kernel]:
    """The distinct kernels that candidates of the target models run: a calibration focused on them.

    For each target (a built-in workload name or a study spec path) the dense plan, the uniform
    int8 and int4 presets and ``plans`` random plans of its compression space are realized and
    their kernels extracted; kernels repeated across plans are kept once. Random weights
    suffice: kernel shapes do not depend on them.

    Example:
        >>> ks = workload_kernels(["digits-cnn"], plans=2)
        >>> len(ks) > 10 and all(k.layer == "" for k in ks)
        True
    """
    from edgeslim.objectives._kernels import extract_graph

    rng = np.random.default_rng(seed + _FOCUS_SEED)
    found: dict[tuple[Any, ...], Kernel] = {}
    built = [_focus_target(t) for t in targets]  # bad targets fail before any work
    total, done = len(built) * (plans + 3), 0
    for model, x, rules in built:
        space = CompressionSpace.build(model, x, rules) if rules is not None else CompressionSpace.build(model, x)
        dists = space.distributions()
        drawn = [space.dense_plan(), space.uniform_plan(bits=8), space.uniform_plan(bits=4)]
        drawn += [space.plan_from_params({k: d.choices[int(rng.integers(len(d.choices)))] for k, d in dists.items()})
                  for _ in range(plans)]
        for plan in drawn:
            kernels, _ = extract_graph(space.realize(model, plan), x)
            for k in kernels:
                found.setdefault(k.shape, dataclasses.replace(k, layer=""))
            done += 1
            if progress:
                progress(done, total)
    return list(found.values())

"""Pick a variant under an SLO: the most accurate variant meeting every budget, or why none does."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from edgeslim.search._budgets import BUDGETS, budget_value, check_budgets
from edgeslim.spaces import NoFitError

__all__ = ["SLO", "NoFitError", "Miss", "select", "misses"]


@dataclasses.dataclass(frozen=True)
class SLO:
    """Budgets a shipped variant must meet; ``None`` means "no budget".

    ``p95=True`` applies ``max_latency_ms`` to the p95 latency instead of the median.
    Accuracy budgets are fractions (0..1); drops are in percentage points.

    Example:
        >>> SLO(max_latency_ms=1.0, min_accuracy=0.95).active()
        {'max_latency_ms': 1.0, 'min_accuracy': 0.95}
    """

    max_latency_ms: float | None = None
    p95: bool = False
    max_size_kb: float | None = None
    max_energy_mj: float | None = None
    min_accuracy: float | None = None
    max_accuracy_drop_pp: float | None = None
    max_class_drop_pp: float | None = None

    def __post_init__(self) -> None:
        if self.min_accuracy is not None and self.max_accuracy_drop_pp is not None:
            raise ValueError("give min_accuracy or max_accuracy_drop_pp, not both")
        check_budgets(self.active(), tuple(BUDGETS))

    def active(self) -> dict[str, float]:
        """The budgets that are set."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "p95"}


@dataclasses.dataclass(frozen=True)
class Miss:
    """One budget a variant misses, and by how much (in the budget's own unit)."""

    budget: str
    limit: float
    value: float

    @property
    def by(self) -> float:
        """How far past the limit (always positive)."""
        return abs(self.value - self.limit)

    @property
    def relative(self) -> float:
        """Miss relative to the limit (0.1 = 10 % past it)."""
        return self.by / max(abs(self.limit), 1e-12)

    def __str__(self) -> str:
        return f"{self.budget}: {self.value:.4g} vs limit {self.limit:.4g} (off by {self.by:.4g}, {self.relative:.0%})"


def misses(entry: dict[str, Any], slo: SLO) -> list[Miss]:
    """The budgets ``entry`` misses (an unknown metric counts as a miss).

    Example:
        >>> misses({"accuracy": 0.9, "latency_ms": 2.0}, SLO(max_latency_ms=1.0, min_accuracy=0.95))
        [Miss(budget='max_latency_ms', limit=1.0, value=2.0), Miss(budget='min_accuracy', limit=0.95, value=0.9)]
    """
    out = []
    for budget, limit in slo.active().items():
        value = budget_value(entry, budget, slo.p95)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out.append(Miss(budget, limit, float("inf")))
        elif BUDGETS[budget].missed(value, limit):
            out.append(Miss(budget, limit, float(value)))
    return out


def select(entries: Sequence[dict[str, Any]], slo: SLO, nearest: int = 3) -> dict[str, Any]:
    """The most accurate entry meeting every budget (ties: lowest latency, then trial number).

    Raises :class:`NoFitError` listing the ``nearest`` entries (smallest summed relative miss)
    and what each misses, so the user knows what to relax.

    Example:
        >>> front = [{"trial": 0, "accuracy": 0.99, "latency_ms": 2.0}, {"trial": 3, "accuracy": 0.97, "latency_ms": 0.8}]
        >>> select(front, SLO(max_latency_ms=1.0))["trial"]
        3
    """
    fitting = [e for e in entries if not misses(e, slo)]
    if fitting:
        return max(fitting, key=lambda e: (e.get("accuracy", -math.inf), -e.get("latency_ms", math.inf),
                                           -e["trial"]))
    ranked = sorted(((e, misses(e, slo)) for e in entries),
                    key=lambda em: (sum(min(m.relative, 1e6) for m in em[1]), em[0]["trial"]))[:nearest]
    lines = [f"  trial {e['trial']}: " + "; ".join(str(m) for m in ms) for e, ms in ranked]
    raise NoFitError(f"no variant among {len(entries)} meets the SLO {slo.active()}; nearest:\n" + "\n".join(lines)
                     + "\nrelax the budget that is missed by the least, or run more trials", ranked)

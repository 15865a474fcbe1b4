"""Budgets, in one place: what each budget bounds, in which unit, and which way.

The spec's ``[budgets]``, the search's Optuna constraints, ``pick``'s SLO, the CLI flags and
the report's shading all read this table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["BUDGETS", "Budget", "SEARCH_BUDGETS", "budget_value", "check_budgets", "constraint_values"]


@dataclasses.dataclass(frozen=True)
class Budget:
    """One budget: the record key it reads, whether it is an upper bound, and ``scale`` taking
    the record's unit to the budget's (``size_bytes`` × 1e-3 = kB).

    Example:
        >>> BUDGETS["max_size_kb"].to_budget_unit(20_000)
        20.0
    """

    name: str
    key: str
    upper: bool
    scale: float
    help: str
    from_baseline: bool = False  # read from the record's ``vs_baseline`` deltas

    def to_budget_unit(self, value: float) -> float:
        """A record value in the budget's unit."""
        return value * self.scale

    def missed(self, value: float, limit: float) -> bool:
        """Whether ``value`` (budget unit) misses ``limit``."""
        return value > limit if self.upper else value < limit


BUDGETS: dict[str, Budget] = {b.name: b for b in (
    Budget("max_latency_ms", "latency_ms", True, 1.0, "median latency (ms); with p95 the p95 latency"),
    Budget("max_size_kb", "size_bytes", True, 1e-3, "model size (kB)"),
    Budget("max_energy_mj", "energy_mj", True, 1.0, "energy per inference (mJ, estimate)"),
    Budget("min_accuracy", "accuracy", False, 1.0, "held-out top-1 accuracy (0..1)"),
    Budget("max_accuracy_drop_pp", "accuracy_drop_pp", True, 1.0, "accuracy drop vs dense (pp)", True),
    Budget("max_class_drop_pp", "max_class_drop_pp", True, 1.0, "largest per-class drop vs dense (pp)", True),
)}

# budgets on an objective's own value: usable as Optuna constraints while searching
SEARCH_BUDGETS = tuple(n for n, b in BUDGETS.items() if not b.from_baseline)


def check_budgets(budgets: Mapping[str, float], allowed: tuple[str, ...] = SEARCH_BUDGETS) -> dict[str, float]:
    """``budgets`` validated: known names, finite non-negative limits, accuracy within [0, 1].

    Example:
        >>> check_budgets({"max_size_kb": 20})
        {'max_size_kb': 20.0}
        >>> check_budgets({"max_size": 20})
        Traceback (most recent call last):
        ...
        edgeslim.spaces._errors.SpecError: unknown budget 'max_size'; choose from ['max_latency_ms', 'max_size_kb', 'max_energy_mj', 'min_accuracy']
    """
    from edgeslim.spaces import SpecError  # here, so the CLI reads BUDGETS without loading torch

    out = {}
    for name, value in budgets.items():
        if name not in allowed:
            raise SpecError(f"unknown budget {name!r}; choose from {list(allowed)}")
        v = float(value)
        if not math.isfinite(v) or v < 0 or (name == "min_accuracy" and v > 1):
            raise SpecError(f"budget {name} must be {'in [0, 1]' if name == 'min_accuracy' else '>= 0'}, "
                            f"got {value!r}")
        out[name] = v
    return out


def budget_value(record: Mapping[str, Any], name: str, p95: bool = False) -> float | None:
    """The value a budget reads from a front record, in the budget's unit (None if absent).

    Example:
        >>> budget_value({"size_bytes": 12_000}, "max_size_kb")
        12.0
    """
    b = BUDGETS[name]
    source = record.get("vs_baseline", {}) if b.from_baseline else record
    key = "latency_p95_ms" if (p95 and name == "max_latency_ms") else b.key
    value = source.get(key)
    return None if value is None else b.to_budget_unit(float(value))


def constraint_values(budgets: Mapping[str, float], metrics: Mapping[str, Any]) -> dict[str, float]:
    """Optuna constraint values (feasible when ≤ 0) of the budgets whose metric was scored.

    Example:
        >>> constraint_values({"max_size_kb": 20, "min_accuracy": 0.9}, {"size_bytes": 25_000, "accuracy": 0.95})
        {'max_size_kb': 5.0, 'min_accuracy': -0.04999999999999993}
    """
    out = {}
    for name, limit in budgets.items():
        b = BUDGETS[name]
        if b.key in metrics:
            value = b.to_budget_unit(metrics[b.key])
            out[name] = (value - limit) if b.upper else (limit - value)
    return out

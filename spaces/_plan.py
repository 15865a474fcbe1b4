"""Plan: one frozen, JSON-serializable compression decision per pruning group and layer."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from edgeslim.spaces._errors import InfeasiblePlanError

__all__ = ["LayerPlan", "Plan", "PLAN_SCHEMA_VERSION"]

PLAN_SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Rank ratio and weight bits of one layer. ``rank=1.0`` keeps it unfactorized.

    Example:
        >>> LayerPlan(rank=0.5, bits=8)
        LayerPlan(rank=0.5, bits=8)
    """

    rank: float = 1.0
    bits: int = 32


@dataclasses.dataclass(frozen=True)
class Plan:
    """A compression candidate: sparsity per pruning group, rank and bits per layer.

    Groups and layers are stored as sorted tuples so that a plan is hashable and two equal
    plans compare equal; ``to_json``/``from_json`` round-trip exactly.

    Example:
        >>> p = Plan.from_dicts({"conv1": 0.5}, {"fc": LayerPlan(rank=0.5, bits=8)})
        >>> Plan.from_json(p.to_json()) == p
        True
        >>> p.sparsity_of("conv1"), p.layer("fc").bits
        (0.5, 8)
    """

    groups: tuple[tuple[str, float], ...] = ()
    layers: tuple[tuple[str, LayerPlan], ...] = ()

    @classmethod
    def from_dicts(cls, groups: Mapping[str, float], layers: Mapping[str, LayerPlan]) -> Plan:
        """Build a plan from ``{group: sparsity}`` and ``{layer: LayerPlan}``."""
        return cls(
            tuple(sorted((k, float(v)) for k, v in groups.items())),
            tuple(sorted(layers.items())),
        )

    def sparsity_of(self, group: str) -> float:
        """Sparsity of ``group`` (0.0 when the plan does not mention it)."""
        return dict(self.groups).get(group, 0.0)

    def layer(self, fqn: str) -> LayerPlan:
        """Rank/bits of layer ``fqn`` (dense fp32 when the plan does not mention it)."""
        return dict(self.layers).get(fqn, LayerPlan())

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, schema-versioned."""
        return {
            "version": PLAN_SCHEMA_VERSION,
            "groups": {k: v for k, v in self.groups},
            "layers": {k: {"rank": v.rank, "bits": v.bits} for k, v in self.layers},
        }

    def to_json(self) -> str:
        """Compact, key-sorted JSON (stable: equal plans give equal strings)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Inverse of ``to_dict``; rejects other schema versions and malformed entries."""
        version = data.get("version")
        if version != PLAN_SCHEMA_VERSION:
            raise InfeasiblePlanError(
                f"plan schema version must be {PLAN_SCHEMA_VERSION}, got {version!r}; "
                "re-create the plan with this edgeslim version")
        try:
            groups = {str(k): float(v) for k, v in data.get("groups", {}).items()}
            layers = {str(k): LayerPlan(rank=float(v["rank"]), bits=int(v["bits"]))
                      for k, v in data.get("layers", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InfeasiblePlanError(f"malformed plan JSON ({e!r}); expected "
                                      '{"version": 1, "groups": {name: sparsity}, '
                                      '"layers": {name: {"rank": r, "bits": b}}}') from None
        return cls.from_dicts(groups, layers)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse ``to_json`` output."""
        return cls.from_dict(json.loads(text))

    def summary(self) -> str:
        """One short line: mean sparsity, factorized layers, bits histogram."""
        sp = [v for _, v in self.groups]
        mean_sp = sum(sp) / len(sp) if sp else 0.0
        n_fact = sum(1 for _, lp in self.layers if lp.rank < 1.0)
        bits: dict[int, int] = {}
        for _, lp in self.layers:
            bits[lp.bits] = bits.get(lp.bits, 0) + 1
        bits_s = " ".join(f"{b}b:{n}" for b, n in sorted(bits.items()))
        return f"sparsity {mean_sp:.2f} | low-rank {n_fact} | {bits_s}"

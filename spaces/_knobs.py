"""Knobs (what one layer or group may change) and per-layer rules (which knobs, which values)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import ClassVar

from optuna.distributions import CategoricalDistribution

from edgeslim.spaces._errors import SpaceError

__all__ = [
    "BitsKnob",
    "Knob",
    "LayerRule",
    "RankKnob",
    "RuleSet",
    "SparsityKnob",
    "SUPPORTED_BITS",
]

SUPPORTED_BITS: tuple[int, ...] = (4, 8, 32)


@dataclasses.dataclass(frozen=True)
class Knob:
    """A named, discrete choice for one layer or pruning group.

    The Optuna parameter name is ``f"{target}.{suffix}"``; the distribution is the one source
    of truth for the allowed values.

    Example:
        >>> k = SparsityKnob("layer1.0.conv1", (0.0, 0.5))
        >>> k.param_name, k.to_distribution().choices
        ('layer1.0.conv1.sparsity', (0.0, 0.5))
    """

    suffix: ClassVar[str] = ""
    target: str
    choices: tuple[float | int, ...]

    @property
    def param_name(self) -> str:
        """Stable Optuna parameter name built from the layer's fully qualified name."""
        return f"{self.target}.{self.suffix}"

    def to_distribution(self) -> CategoricalDistribution:
        """The Optuna distribution this knob samples from."""
        return CategoricalDistribution(self.choices)


@dataclasses.dataclass(frozen=True)
class SparsityKnob(Knob):
    """Share of output channels removed from a pruning group (coupled layers share it)."""

    suffix: ClassVar[str] = "sparsity"


@dataclasses.dataclass(frozen=True)
class RankKnob(Knob):
    """Kept rank as a ratio of full rank; 1.0 means the layer is not factorized."""

    suffix: ClassVar[str] = "rank"


@dataclasses.dataclass(frozen=True)
class BitsKnob(Knob):
    """Weight bit-width; 8 or fewer also quantizes the layer's input activations to 8 bits."""

    suffix: ClassVar[str] = "bits"


def _floats(name: str, values: Sequence[float], low: float, high: float, high_open: bool, hint: str) -> tuple[float, ...]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SpaceError(f"{name} values must be numbers, got {v!r}; {hint}")
        ok = low <= v < high if high_open else low < v <= high
        if not ok:
            interval = f"[{low}, {high})" if high_open else f"({low}, {high}]"
            raise SpaceError(f"{name} must be in {interval}, got {v!r}; {hint}")
        out.append(float(v))
    if not out:
        raise SpaceError(f"{name} needs at least one value; {hint}")
    return tuple(sorted(set(out)))


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """Allowed values for one layer; ``None`` means "inherit from the default rule".

    ``freeze=True`` keeps the layer dense, unfactorized and fp32.

    Example:
        >>> LayerRule(sparsity=(0.0, 0.5), bits=(8, 32)).bits
        (8, 32)
    """

    sparsity: tuple[float, ...] | None = None
    rank: tuple[float, ...] | None = None
    bits: tuple[int, ...] | None = None
    freeze: bool = False

    def __post_init__(self) -> None:
        if self.sparsity is not None:
            object.__setattr__(self, "sparsity", _floats(
                "sparsity", self.sparsity, 0.0, 1.0, True, "use 0.0 to keep every channel"))
        if self.rank is not None:
            object.__setattr__(self, "rank", _floats(
                "rank ratio", self.rank, 0.0, 1.0, False, "use 1.0 to disable factorization"))
        if self.bits is not None:
            bad = [b for b in self.bits if b not in SUPPORTED_BITS]
            if bad or not self.bits:
                raise SpaceError(
                    f"bits must be a non-empty subset of {list(SUPPORTED_BITS)}, got {list(self.bits)!r}; "
                    "use 32 to keep a layer in float")
            object.__setattr__(self, "bits", tuple(sorted(set(self.bits))))

    def merged_over(self, default: LayerRule) -> LayerRule:
        """This rule with unset fields taken from ``default``."""
        return LayerRule(
            sparsity=self.sparsity if self.sparsity is not None else default.sparsity,
            rank=self.rank if self.rank is not None else default.rank,
            bits=self.bits if self.bits is not None else default.bits,
            freeze=self.freeze or default.freeze,
        )


DEFAULT_RULE = LayerRule(
    sparsity=(0.0, 0.25, 0.5, 0.75), rank=(0.25, 0.5, 1.0), bits=(4, 8, 32)
)


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """Per-layer rules, resolved as exact FQN first, then ``re:<regex>`` in order, then ``_default``.

    Example:
        >>> rules = RuleSet.from_mapping({"_default": LayerRule(bits=(8, 32)),
        ...                               "re:.*fc$": LayerRule(freeze=True)})
        >>> rules.resolve("head.fc").freeze, rules.resolve("conv1").bits
        (True, (8, 32))
    """

    exact: tuple[tuple[str, LayerRule], ...] = ()
    patterns: tuple[tuple[str, LayerRule], ...] = ()
    default: LayerRule = DEFAULT_RULE

    @classmethod
    def from_mapping(cls, rules: Mapping[str, LayerRule]) -> RuleSet:
        """Build from ``{"fqn" | "re:<regex>" | "_default": LayerRule}``."""
        exact, patterns = [], []
        default = DEFAULT_RULE
        for key, rule in rules.items():
            if key == "_default":
                default = rule.merged_over(DEFAULT_RULE)
            elif key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as e:
                    raise SpaceError(f"rule key {key!r} is not a valid regular expression ({e}); "
                                     "write it as re:<python regex>") from None
                patterns.append((key[3:], rule))
            else:
                exact.append((key, rule))
        return cls(tuple(exact), tuple(patterns), default)

    def resolve(self, fqn: str) -> LayerRule:
        """The effective rule of layer ``fqn``."""
        for key, rule in self.exact:
            if key == fqn:
                return rule.merged_over(self.default)
        for pattern, rule in self.patterns:
            if re.fullmatch(pattern, fqn):
                return rule.merged_over(self.default)
        return self.default

    def unknown_exact(self, fqns: Sequence[str]) -> list[str]:
        """Exact rule keys that name no layer (likely typos)."""
        known = set(fqns)
        return [k for k, _ in self.exact if k not in known]

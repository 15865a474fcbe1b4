"""Exceptions raised by edgeslim.

Every error edgeslim raises on purpose derives from one root, so callers can catch them all::

    EdgeslimError
    ├── SpecError            (also ValueError)  a study spec or CLI option is malformed
    │   └── ProfileError                          a device profile is missing, corrupted or unknown
    ├── SpaceError           (also ValueError)  the search space is empty or a rule is invalid
    ├── InfeasiblePlanError  (also ValueError)  a plan cannot be realized on this model
    ├── ObjectiveError       (also RuntimeError) a candidate could not be scored
    └── NoFitError                               no variant meets an SLO (``nearest`` says what each misses)

The module lives in ``edgeslim.spaces`` because that package sits at the bottom of the import
graph; ``edgeslim.objectives`` and ``edgeslim.search`` re-export the names. Every error path of
the CLI prints one line and exits 2 (3 for ``NoFitError`` from ``pick``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["EdgeslimError", "InfeasiblePlanError", "NoFitError", "ObjectiveError", "ProfileError", "SpaceError",
           "SpecError"]


class EdgeslimError(Exception):
    """Root of all edgeslim errors.

    Example:
        >>> try:
        ...     raise SpecError("bad")
        ... except EdgeslimError as e:
        ...     str(e)
        'bad'
    """


class SpecError(EdgeslimError, ValueError):
    """A study spec, model/data reference or CLI option is invalid."""


class SpaceError(EdgeslimError, ValueError):
    """The search space is empty (everything frozen) or a per-layer rule is invalid."""


class InfeasiblePlanError(EdgeslimError, ValueError):
    """A plan cannot be realized: a layer pruned to zero channels, a rank out of bounds, ..."""


class ObjectiveError(EdgeslimError, RuntimeError):
    """Scoring a candidate failed (export, runtime, missing dependency of an objective)."""


class ProfileError(SpecError):
    """A device profile is missing, corrupted, hand-edited into an invalid state, or unknown."""


class NoFitError(EdgeslimError):
    """No variant meets the SLO; ``nearest`` lists the closest variants and what each misses
    (pairs of a front record and its list of misses).

    Example:
        >>> NoFitError("no variant fits", nearest=[]).nearest
        []
    """

    def __init__(self, message: str, nearest: list[tuple[dict[str, Any], list[Any]]]) -> None:
        super().__init__(message)
        self.nearest = nearest

"""Exceptions raised by edgeslim.

Every error edgeslim raises on purpose derives from one root, so callers can catch them all::

    EdgeslimError
    ├── SpecError            (also ValueError)  a study spec or CLI option is malformed
    ├── SpaceError           (also ValueError)  the search space is empty or a rule is invalid
    ├── InfeasiblePlanError  (also ValueError)  a plan cannot be realized on this model
    └── ObjectiveError       (also RuntimeError) a candidate could not be scored

The module lives in ``edgeslim.spaces`` because that package sits at the bottom of the import
graph; ``edgeslim.objectives`` and ``edgeslim.search`` re-export the names.
"""

from __future__ import annotations

__all__ = ["EdgeslimError", "InfeasiblePlanError", "ObjectiveError", "SpaceError", "SpecError"]


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

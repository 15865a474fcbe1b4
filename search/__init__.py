"""How the search runs: study, samplers, Pareto front, report, CLI.

Heavy parts (torch, optuna, plotly) load on first use, so ``edgeslim --help`` stays fast.

The Python API is Optuna's own loop around :class:`CompressionObjective`; the CLI runs it
through :func:`run_search`.

Example:
    >>> from edgeslim.search import PRESETS, CompressionObjective, pareto_front, write_report, export
    >>> sorted(p for p in ("dense", "uniform-int8") if p in PRESETS)
    ['dense', 'uniform-int8']
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CompressionObjective": "_objective", "PRESETS": "_objective", "DEFAULT_OBJECTIVES": "_objective",
    "score_plan": "_objective", "is_dense": "_objective", "ordered_objectives": "_objective",
    "pareto_front": "_api", "write_report": "_api", "export": "_api",
    "run_search": "_study", "SearchResult": "_study", "make_sampler": "_study",
    "StudySpec": "_spec", "load_spec": "_spec", "parse_spec": "_spec", "demo_spec": "_spec",
    "ModelSpec": "_spec", "DataSpec": "_spec", "DeviceSpec": "_spec", "FinetuneSpec": "_spec", "RuleSpec": "_spec",
    "SpaceSpec": "_spec", "BudgetsSpec": "_spec", "RefineSpec": "_spec",
    "spec_device": "_study", "spec_objective": "_study", "open_storage": "_storage",
    "VALIDATION_WORKLOADS": "_check",
    "front_entries": "_front", "write_front": "_front", "all_records": "_front",
    "ReportData": "_report", "build_report_data": "_report",
    "Workload": "_workloads", "load_workload": "_workloads", "DigitsCNN": "_workloads",
    "DigitsResNet": "_workloads", "digits_splits": "_workloads", "digits_rgb32": "_workloads",
    "SLO": "_pick", "Miss": "_pick", "select": "_pick",
    "BUDGETS": "_budgets", "Budget": "_budgets",
    "ExportResult": "_export", "export_variant": "_export", "write_variant": "_export", "list_variants": "_export",
    "open_study_dir": "_export", "refine_study": "_refine", "RefineResult": "_refine",
    "seed_study": "_sensitivity", "sensitivity_profile": "_sensitivity", "solve_front": "_sensitivity",
    "fit_surrogate": "_sensitivity", "surrogate_quality": "_sensitivity", "SensitivityProfile": "_sensitivity",
    "KnobEffect": "_sensitivity", "ReseedCallback": "_sensitivity",
    "structure_networks": "_structures", "random_structure": "_structures",
    "focus_networks": "_check",
    "optimize_seeded": "_sensitivity", "load_profile": "_sensitivity", "Surrogate": "_sensitivity", "SeedResult": "_sensitivity",
    # the exception tree lives at the bottom of the import graph (edgeslim.spaces)
    "EdgeslimError": "edgeslim.spaces", "SpecError": "edgeslim.spaces", "SpaceError": "edgeslim.spaces",
    "InfeasiblePlanError": "edgeslim.spaces", "ObjectiveError": "edgeslim.spaces",
    "ProfileError": "edgeslim.spaces", "NoFitError": "edgeslim.spaces",
    "main": "cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        where = _EXPORTS[name]
        return getattr(importlib.import_module(where if "." in where else f"edgeslim.search.{where}"), name)
    raise AttributeError(f"module 'edgeslim.search' has no attribute {name!r}")

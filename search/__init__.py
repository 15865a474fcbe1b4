"""How the search runs: study, samplers, Pareto front, report, CLI.

Heavy parts (torch, optuna, plotly) load on first use, so ``edgeslim --help`` stays fast.

Example:
    >>> from edgeslim.search import demo_spec, run_search
    >>> result = run_search(demo_spec().replace(trials=5))  # doctest: +SKIP
    >>> len(result.front) > 0  # doctest: +SKIP
    True
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run_search": "_study", "SearchResult": "_study", "make_sampler": "_study", "PRESETS": "_study",
    "StudySpec": "_spec", "load_spec": "_spec", "parse_spec": "_spec", "demo_spec": "_spec",
    "front_entries": "_front", "write_front": "_front",
    "ReportData": "_report", "build_report_data": "_report", "write_report": "_report",
    "Workload": "_workloads", "load_workload": "_workloads", "DigitsCNN": "_workloads",
    "DigitsResNet": "_workloads", "digits_splits": "_workloads",
    "SLO": "_pick", "NoFitError": "_pick", "select": "_pick",
    "export_variant": "_export", "list_variants": "_export",
    "main": "cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"edgeslim.search.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'edgeslim.search' has no attribute {name!r}")

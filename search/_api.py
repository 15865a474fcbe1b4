"""The Python API's study-level verbs: the front, the report and export, on any Optuna study
a :class:`CompressionObjective` scored."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna

from edgeslim.search._front import front_entries
from edgeslim.search._objective import CompressionObjective

__all__ = ["export", "pareto_front", "write_report"]


def pareto_front(study: optuna.Study) -> list[dict[str, Any]]:
    """The study's Pareto-optimal (and, under budgets, feasible) trials as records, best accuracy
    first, as ``pareto.json`` holds them: objective values, plan, per-class accuracy, and
    ``vs_baseline`` deltas against the study's dense trial.

    Example:
        >>> [e["trial"] for e in pareto_front(study)]  # doctest: +SKIP
        [0, 7, 3]
    """
    return front_entries(study, list(study.metric_names or []))


def write_report(study: optuna.Study | Any, path: str | Path, budgets: Mapping[str, float] | None = None,
                 title: str | None = None, picked: int | None = None) -> Path:
    """Write the study's self-contained HTML report (plotly) to ``path``: per cost, accuracy
    against it with that pair's Pareto staircase over all trials; the front table; the plans and
    per-class changes of the front. ``budgets`` are shaded; ``picked`` is circled. Also takes a
    :class:`ReportData` as built by :func:`build_report_data`.

    Example:
        >>> write_report(study, "report.html")  # doctest: +SKIP
        PosixPath('report.html')
    """
    from edgeslim.search import _report

    if isinstance(study, _report.ReportData):
        return _report.render_report(study, Path(path))
    names = list(study.metric_names or [])
    data = _report.build_report_data(study, names, front_entries(study, names), dict(budgets or {}),
                                     title or f"edgeslim study {study.study_name}", picked)
    return _report.render_report(data, Path(path))


def export(objective: CompressionObjective, study: optuna.Study, trial: int, out: str | Path, *,
           steps: int | None = None, slo: Any = None) -> Any:
    """Ship trial ``trial``: ONNX artifact, ``card.json`` and ``MODEL_CARD.md`` in the empty folder
    ``out``, scored again through the objective's pipeline (see
    :meth:`CompressionObjective.export`).

    Example:
        >>> export(objective, study, trial=12, out="ship/").card["artifact"]["bytes"]  # doctest: +SKIP
        10412
    """
    return objective.export(study, trial, out, steps=steps, slo=slo)

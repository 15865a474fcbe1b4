"""The Pareto front of a study as plain records, and writing pareto.json / pareto.csv."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = ["all_records", "baseline_record", "baseline_trial", "front_entries", "scored_record", "trial_record", "write_front"]

METRIC_KEYS = ("latency_p95_ms", "latency_method", "energy_method", "artifact_bytes", "runtime_bits",
               "runtime_kernels", "accuracy_method", "torch_accuracy",
               "per_class_accuracy", "seconds", "latency_reference_ms", "latency_speedup_paired",
               "latency_speedup_spread")


def baseline_trial(study: optuna.Study) -> FrozenTrial | None:
    """The study's completed dense (uncompressed) baseline trial, if any."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("preset") == "dense":
            return t
    return None


def trial_record(trial: FrozenTrial, names: Sequence[str]) -> dict[str, Any]:
    """Objective values, plan and side metrics of one completed trial.

    Example:
        >>> trial_record(study.best_trials[0], ["accuracy"])["trial"]  # doctest: +SKIP
        0
    """
    rec: dict[str, Any] = {"trial": trial.number, "preset": trial.user_attrs.get("preset", "")}
    rec.update(dict(zip(names, trial.values)))
    for key in METRIC_KEYS:
        if key in trial.user_attrs:
            rec[key] = trial.user_attrs[key]
    rec["feasible"] = all(v <= 0 for v in trial.user_attrs.get("constraints", {}).values())
    rec["constraints"] = trial.user_attrs.get("constraints", {})
    rec["plan"] = trial.user_attrs.get("plan")
    rec["plan_summary"] = trial.user_attrs.get("plan_summary", "")
    return rec


def _deltas(rec: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    if "accuracy" in rec and "accuracy" in base:
        out["accuracy_drop_pp"] = 100.0 * (base["accuracy"] - rec["accuracy"])
    if "per_class_accuracy" in rec and "per_class_accuracy" in base:
        drops = [100.0 * (b - a) for a, b in zip(rec["per_class_accuracy"], base["per_class_accuracy"])
                 if not (math.isnan(a) or math.isnan(b))]
        out["max_class_drop_pp"] = max(drops) if drops else 0.0
    for key, name in (("size_bytes", "size_reduction"), ("latency_ms", "latency_speedup"),
                      ("energy_mj", "energy_reduction")):
        if key in rec and key in base and rec[key] > 0:
            out[name] = base[key] / rec[key]
    if "latency_speedup_paired" in rec:  # timed in the same windows as dense: no drift between the two
        out["latency_speedup"] = rec["latency_speedup_paired"]
        out["latency_speedup_spread"] = rec["latency_speedup_spread"]
    return out


_BASE_KEYS = ("latency_p95_ms", "per_class_accuracy", "trial")
_SEARCH_KEYS = ("latency_p95_ms", "per_class_accuracy", "accuracy_method", "latency_method",
                "latency_speedup_paired", "latency_speedup_spread", "latency_reference_ms")


def baseline_record(study: optuna.Study, names: Sequence[str]) -> dict[str, Any]:
    """The dense baseline trial's record, or {} before it completed."""
    base_t = baseline_trial(study)
    return trial_record(base_t, names) if base_t else {}


def scored_record(trial: FrozenTrial, names: Sequence[str], base: dict[str, Any],
                  refined: dict[str, Any] | None = None) -> dict[str, Any]:
    """A trial's record with ``baseline`` and ``vs_baseline``; where the refine stage scored
    the trial (``refined``: the study's ``refined`` user attribute), its figures replace the
    search's, which stay under ``search``, and the deltas are taken against the refined dense
    baseline (the same artifact protocol on both sides)."""
    rec = trial_record(trial, names)
    refined = refined or {}
    again = refined.get("trials", {}).get(str(trial.number))
    if again:
        rec["search"] = {k: rec[k] for k in (*names, *_SEARCH_KEYS) if k in rec}
        for key in _SEARCH_KEYS:  # no search-time side figure may pass for a refined one
            rec.pop(key, None)
        rec.update(again)
        base = refined.get("baseline", base)
    rec["refined"] = bool(again)
    rec["baseline"] = {k: base[k] for k in (*names, *_BASE_KEYS) if k in base}
    rec["vs_baseline"] = _deltas(rec, base) if base else {}
    return rec


def all_records(study: optuna.Study) -> list[dict[str, Any]]:
    """Every completed trial as a front-style record with ``vs_baseline`` deltas."""
    names = list(study.metric_names or [])
    base, refined = baseline_record(study, names), study.user_attrs.get("refined")
    return [scored_record(t, names, base, refined)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def front_entries(study: optuna.Study, names: Sequence[str]) -> list[dict[str, Any]]:
    """Pareto-optimal (and, under budgets, feasible) trials, best accuracy first.

    Every entry carries ``baseline`` (the dense trial's metrics) and ``vs_baseline``
    (accuracy drop in percentage points, largest per-class drop, size/latency/energy ratios;
    the latency ratio is the paired one, timed with the dense artifact in the same windows,
    where the trial has it, with the range of its pairs in ``latency_speedup_spread``).
    Trials the refine stage scored carry its figures (see :func:`scored_record`).
    """
    base, refined = baseline_record(study, names), study.user_attrs.get("refined")
    entries = [scored_record(t, names, base, refined) for t in study.best_trials]
    key = names[0] if names and names[0] == "accuracy" else None
    entries.sort(key=lambda r: (-r[key] if key else 0, r.get("latency_ms", 0), r["trial"]))
    return entries


_CSV_COLUMNS = ("trial", "preset", "refined", "accuracy", "size_bytes", "latency_ms", "latency_p95_ms", "energy_mj",
                "accuracy_drop_pp", "max_class_drop_pp", "size_reduction", "latency_speedup",
                "energy_reduction", "feasible", "plan_summary", "plan")


def write_front(entries: list[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """Write ``pareto.json`` (the full entries) and ``pareto.csv`` (one flat row per entry)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, cpath = out_dir / "pareto.json", out_dir / "pareto.csv"
    tmp = jpath.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(entries, indent=2, sort_keys=True, default=float))
    tmp.replace(jpath)
    with cpath.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for e in entries:
            row = {**e, **e.get("vs_baseline", {})}
            row["plan"] = json.dumps(e.get("plan"), sort_keys=True)
            w.writerow(row)
    return jpath, cpath

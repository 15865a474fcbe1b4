"""optuna-dashboard opens edgeslim studies unchanged: objective names, user attributes (budgets
included, as the `constraints` attribute), the Pareto front. The study is read through the dashboard's own WSGI app, as the browser does."""

from __future__ import annotations

import json
from wsgiref.util import setup_testing_defaults

import optuna
import pytest

from edgeslim.search import demo_spec, run_search

optuna_dashboard = pytest.importorskip("optuna_dashboard")


def _get(app, path: str, query: str = "") -> dict:
    env: dict = {}
    setup_testing_defaults(env)
    env["PATH_INFO"], env["QUERY_STRING"] = path, query
    status: dict = {}
    body = b"".join(app(env, lambda s, h, exc=None: status.update(s=s)))
    assert status["s"].startswith("200"), (path, status, body[:300])
    return json.loads(body)


def test_dashboard_reads_objectives_attrs_constraints_and_front(tmp_path):
    spec = demo_spec().replace(name="dash", trials=7, out_dir=str(tmp_path / "dash"))
    spec = spec.replace(budgets=spec.budgets.__class__(max_size_kb=40.0),
                        finetune=spec.finetune.__class__(steps=10, lr=2e-3))
    result = run_search(spec, stream=open("/dev/null", "w"))
    storage = optuna.storages.RDBStorage(spec.storage_url)
    app = optuna_dashboard.wsgi(storage)
    summaries = _get(app, "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in summaries] == ["dash"]
    study = _get(app, f"/api/studies/{summaries[0]['study_id']}", "after=0")
    assert study["objective_names"] == result.objective_names == ["accuracy", "size_bytes", "latency_ms", "energy_mj"]
    assert study["directions"] == ["maximize", "minimize", "minimize", "minimize"]
    assert len(study["trials"]) == len(result.study.trials) == 7
    keys = {a["key"] for a in study["union_user_attrs"]}
    assert {"plan_summary", "latency_p95_ms", "constraints", "per_class_accuracy"} <= keys, keys
    by_number = {t["number"]: t for t in study["trials"]}
    for trial in result.study.trials:
        shown = by_number[trial.number]
        assert shown["values"] == pytest.approx(trial.values)
        attrs = {a["key"]: a["value"] for a in shown["user_attrs"]}
        assert json.loads(attrs["constraints"]) == pytest.approx(trial.user_attrs["constraints"])
        assert attrs["plan_summary"] == trial.user_attrs["plan_summary"]
    # optuna-dashboard 0.21 reads Optuna 4's unnamed constraint list, not Optuna 5's named ones, so
    # its front ignores the budgets: it holds ours (feasible only) plus trials over budget
    ours = {t.number for t in result.study.best_trials}
    theirs = {t["number"] for t in study["best_trials"]}
    assert ours and ours <= theirs
    assert all(result.study.trials[n].user_attrs["constraints"]["max_size_kb"] > 0 for n in theirs - ours)
    assert result.study.trials[0].user_attrs["constraints"]["max_size_kb"] > 0  # dense (114 KB) is over 40 KB

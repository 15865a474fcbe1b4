"""Integration: a small search on digits, resume, failures, budgets, outputs."""

from __future__ import annotations

import csv
import io
import json

import pytest
from optuna.trial import TrialState

from edgeslim.search import PRESETS, demo_spec, run_search
from edgeslim.search._spec import FinetuneSpec, ModelSpec

NAMES = ["accuracy", "size_bytes", "latency_ms", "energy_mj"]


def _spec(tmp_path, **changes):
    base = demo_spec().replace(
        trials=6, out_dir=str(tmp_path / "study"),
        model=ModelSpec(builtin="digits-cnn", train_epochs=3),
        finetune=FinetuneSpec(steps=10, lr=2e-3, batch_size=64),
    )
    return base.replace(**changes)


def _quiet_run(spec):
    return run_search(spec, stream=io.StringIO())


def test_small_search_front_baseline_outputs_and_resume(tmp_path):
    spec = _spec(tmp_path)
    result = _quiet_run(spec)
    trials = result.study.get_trials(states=(TrialState.COMPLETE,))
    assert len(result.study.trials) == 6
    presets = [t.user_attrs.get("preset") for t in trials]
    assert presets[:len(PRESETS)] == list(PRESETS)  # baselines run first
    assert result.study.metric_names == NAMES
    assert [d.name for d in result.study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE", "MINIMIZE"]

    front = json.loads((result.out_dir / "pareto.json").read_text())
    assert isinstance(front, list) and front
    for entry in front:
        assert {"trial", "plan", *NAMES, "latency_p95_ms", "baseline", "vs_baseline"} <= set(entry)
        assert entry["baseline"]["trial"] == 0 and set(NAMES) <= set(entry["baseline"])
        assert entry["latency_p95_ms"] >= entry["latency_ms"] > 0
        assert "estimate" in entry["energy_method"]
        # timed side by side with the dense artifact: the ratio comes from the pair
        assert entry["vs_baseline"]["latency_speedup"] == entry["latency_speedup_paired"]
        assert "paired with the dense baseline" in entry["latency_method"]
    dense = result.study.trials[0]
    assert dense.user_attrs["preset"] == "dense"
    assert dense.user_attrs["plan"]["groups"] == {k: 0.0 for k in dense.user_attrs["plan"]["groups"]}
    rows = list(csv.DictReader((result.out_dir / "pareto.csv").open()))
    assert [int(r["trial"]) for r in rows] == [e["trial"] for e in front]
    html = result.report_path.read_text()
    assert "plotly" in html and "ESTIMATED" in html and "Pareto front" in html

    # every trial can be rebuilt from its stored plan
    from edgeslim.spaces import Plan
    plan = Plan.from_dict(trials[-1].user_attrs["plan"])
    assert result.space.realize(result.workload.model, plan)(result.workload.example_input).shape == (1, 10)

    resumed = _quiet_run(spec.replace(trials=2))
    assert len(resumed.study.trials) == 8
    assert sum(1 for t in resumed.study.trials if t.user_attrs.get("preset") == "dense") == 1
    assert resumed.study.trials[0].values == dense.values


def test_failed_trial_is_recorded_and_study_goes_on(tmp_path, monkeypatch):
    from edgeslim.objectives import _size

    calls = {"n": 0}
    real = _size.model_size_bytes

    def flaky(model):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated exporter crash")
        return real(model)

    monkeypatch.setattr(_size, "model_size_bytes", flaky)
    result = _quiet_run(_spec(tmp_path, trials=3, objectives=["accuracy", "size_bytes"]))
    states = [t.state for t in result.study.trials if t.state != TrialState.WAITING]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert result.study.trials[1].user_attrs["fail_reason"] == "RuntimeError: simulated exporter crash"


def test_budgets_become_optuna_constraints(tmp_path):
    from edgeslim.search._spec import BudgetsSpec

    spec = _spec(tmp_path, trials=2, objectives=["accuracy", "size_bytes"],
                 budgets=BudgetsSpec(max_size_kb=0.0, min_accuracy=0.5))
    result = _quiet_run(spec)
    done = result.study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 2
    for t in done:
        cons = t.user_attrs["constraints"]
        assert cons["max_size_kb"] == pytest.approx(t.values[1] / 1e3)
        assert cons["min_accuracy"] == pytest.approx(0.5 - t.values[0])
        assert t.constraints == cons  # what Optuna's samplers and best_trials read
    assert result.front == []  # no model has zero bytes: nothing is feasible


def test_resume_with_a_different_space_is_refused(tmp_path):
    from edgeslim.search._spec import RuleSpec, SpaceSpec
    from edgeslim.spaces import SpecError

    spec = _spec(tmp_path, trials=1, objectives=["accuracy", "size_bytes"])
    _quiet_run(spec)
    other = spec.replace(space=SpaceSpec(rules={"_default": RuleSpec(bits=[8, 32])}))
    with pytest.raises(SpecError, match="different spec"):
        _quiet_run(other)


def test_report_data_is_computed_before_drawing(tmp_path):
    from edgeslim.search._front import front_entries
    from edgeslim.search._report import build_report_data, render_report

    result = _quiet_run(_spec(tmp_path, trials=3, objectives=["accuracy", "size_bytes"]))
    front = front_entries(result.study, ["accuracy", "size_bytes"])
    data = build_report_data(result.study, ["accuracy", "size_bytes"], front, {"max_size_kb": 50.0}, "t", picked=1)
    assert [p["trial"] for p in data.points] == [0, 1, 2]
    assert {p["trial"] for p in data.points if p["front"]} == {e["trial"] for e in front}
    assert data.baseline_trial == 0 and data.picked == 1
    assert [d["trial"] for d in data.decisions] == [e["trial"] for e in front]
    assert all(len(d) == 10 for _, d in data.class_deltas)
    dense = next((d for t, d in data.class_deltas if t == 0), None)
    assert dense is None or dense == tuple(0.0 for _ in range(10))
    assert data == build_report_data(result.study, ["accuracy", "size_bytes"], front, {"max_size_kb": 50.0}, "t", 1)
    html = render_report(data, tmp_path / "r.html").read_text()
    assert "Picked: trial 1" in html and "Per-class accuracy change" in html


def test_score_artifact_scores_the_exported_onnx(tmp_path):
    """--score artifact: each trial's accuracy is the ONNX file's, run by ONNX Runtime; the torch
    figure is kept beside it and they agree within a point on int8 (fake quant matches the runtime)."""
    spec = _spec(tmp_path, trials=2)
    spec = spec.replace(finetune=FinetuneSpec(steps=10, lr=2e-3, batch_size=64, score="artifact"))
    result = _quiet_run(spec)
    trials = result.study.get_trials(states=(TrialState.COMPLETE,))
    assert [t.user_attrs["preset"] for t in trials] == ["dense", "uniform-int8"]
    for t in trials:
        assert t.user_attrs["accuracy_method"] == "exported ONNX artifact (onnxruntime)"
        assert abs(t.values[0] - t.user_attrs["torch_accuracy"]) <= 0.01
    assert 8 in set(trials[1].user_attrs["runtime_bits"].values())


def test_bad_score_value_is_a_spec_error(tmp_path):
    from edgeslim.spaces import SpecError

    with pytest.raises(SpecError, match="score must be 'torch' or 'artifact', got 'onnx'"):
        _spec(tmp_path, finetune=FinetuneSpec(score="onnx"))

"""The refine stage: the front fine-tuned longer, re-scored on its artifacts, figures kept beside."""

from __future__ import annotations

import io
import json

import optuna
import pytest
from optuna.distributions import FloatDistribution

from edgeslim.search import demo_spec, run_search
from edgeslim.search._refine import near_front, refine_study
from edgeslim.search._spec import FinetuneSpec, ModelSpec
from edgeslim.search.cli import main


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("refine") / "study"
    spec = demo_spec().replace(trials=6, out_dir=str(out), model=ModelSpec(builtin="digits-cnn", train_epochs=3),
                               finetune=FinetuneSpec(steps=10, lr=2e-3, batch_size=64))
    return run_search(spec, stream=io.StringIO())


def test_dense_baseline_is_the_model_as_given(small_study):
    dense = small_study.study.trials[0]
    assert dense.user_attrs["preset"] == "dense"
    assert dense.values[0] == pytest.approx(small_study.workload.base_accuracy)  # no fine-tune drift


def test_refine_scores_the_front_on_artifacts_and_keeps_search_figures(small_study):
    result = refine_study(small_study.out_dir, steps=30, margin_pp=0.5, log=lambda _: None)
    study = small_study.study
    stored = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{small_study.out_dir}/study.db")
    refined = stored.user_attrs["refined"]
    assert refined["settings"]["steps"] == 30 and set(refined["trials"]) == {str(n) for n in result.trials}
    assert {t.number for t in study.best_trials} <= set(result.trials)
    front = json.loads((small_study.out_dir / "pareto.json").read_text())
    assert front and all(e["refined"] for e in front)
    for e in front:
        trial = stored.trials[e["trial"]]
        assert e["search"]["accuracy"] == trial.values[0]  # the search's figure, kept beside
        assert "exported ONNX artifact" in e["accuracy_method"]
        assert e["baseline"]["trial"] == "dense (refine protocol)"
        assert e["vs_baseline"]["accuracy_drop_pp"] == pytest.approx(
            100 * (refined["baseline"]["accuracy"] - e["accuracy"]))
        assert e["refine"]["steps"] == (0 if e["preset"] == "dense" else 30)
    html = (small_study.out_dir / "report.html").read_text()
    assert "search accuracy" in html and "(refined)" in html
    # the trials themselves are untouched: resuming the search sees the search's values
    assert [t.values for t in stored.trials] == [t.values for t in study.trials]


def test_near_front_adds_trials_within_the_margin():
    study = optuna.create_study(directions=["maximize", "minimize"])
    dist = {"x": FloatDistribution(0, 1)}
    for acc, lat in [(0.99, 2.0), (0.95, 1.0), (0.987, 2.5), (0.90, 3.0)]:
        study.add_trial(optuna.trial.create_trial(params={"x": 0.5}, distributions=dist, values=[acc, lat]))
    assert [t.number for t in near_front(study, ["accuracy", "latency_ms"], 0.0)] == [0, 1]
    assert [t.number for t in near_front(study, ["accuracy", "latency_ms"], 0.5)] == [0, 1, 2]


def test_refine_bad_input_is_one_line_exit_2(small_study, tmp_path, capsys):
    assert main(["refine", str(small_study.out_dir), "--steps", "0"]) == 2
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
    empty = tmp_path / "empty"
    optuna.create_study(study_name="e", storage=f"sqlite:///{empty.mkdir() or empty}/study.db",
                        directions=["maximize"]).set_user_attr("spec", demo_spec().to_dict())
    assert main(["refine", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "has no completed trial to refine" in err[-1] and "Traceback" not in "".join(err)
    assert main(["refine", str(tmp_path / "missing")]) == 2

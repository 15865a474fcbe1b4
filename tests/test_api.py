"""The Python API: CompressionObjective under Optuna's own loop, the README's example, one pipeline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest
import torch

from edgeslim.objectives import FinetuneConfig
from edgeslim.search import (BUDGETS, PRESETS, CompressionObjective, NoFitError, ProfileError, SpecError, demo_spec,
                             make_sampler, pareto_front, run_search, write_report)
from edgeslim.search._budgets import SEARCH_BUDGETS, check_budgets, constraint_values
from edgeslim.search._pick import SLO
from edgeslim.search._spec import BudgetsSpec
from edgeslim.spaces import Plan

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_python() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README shows no Python example"
    return blocks[0]


@pytest.mark.slow
def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_readme_python(), "README.md", "exec"), scope)
    study, front = scope["study"], scope["front"]
    assert [t.user_attrs.get("preset") for t in study.trials[:2]] == ["dense", "uniform-int8"]
    assert front and all({"accuracy", "size_bytes", "vs_baseline", "plan"} <= set(e) for e in front)
    assert Path("report.html").read_text().count("<html") == 1
    card = json.loads(Path("ship/card.json").read_text())
    assert card["trial"] == scope["variant"].card["trial"]
    assert Path("ship/model.onnx").stat().st_size == card["artifact"]["bytes"]


@pytest.fixture()
def digits(digits_cnn):
    return digits_cnn


def _objective(work, **kw) -> CompressionObjective:
    kw.setdefault("objectives", ["accuracy", "size_bytes"])
    kw.setdefault("finetune", FinetuneConfig(steps=8, lr=2e-3))
    return CompressionObjective(work.model, work.example_input, work.data.train, work.data.val,
                                rules=demo_spec().space.rule_set(), **kw)


def test_python_api_and_cli_search_score_the_same_plans_identically(tmp_path, digits):
    """The CLI's search is the Python API's loop: same seed, same plans, same figures."""
    spec = demo_spec()
    spec = spec.replace(trials=9, out_dir=str(tmp_path / "cli"), objectives=["accuracy", "size_bytes"],
                        finetune=type(spec.finetune)(steps=8, lr=2e-3, batch_size=spec.finetune.batch_size))
    (tmp_path / "cli").mkdir()
    torch.save({"state_dict": digits.model.state_dict(), "accuracy": digits.base_accuracy,
                "key": json.dumps({"workload": "digits-cnn", "seed": 0, "split": digits.split_hash, "epochs": 40},
                                  sort_keys=True)}, tmp_path / "cli" / "base_model.pt")
    cli = run_search(spec, log=lambda m: None).study
    with _objective(digits, finetune=FinetuneConfig(steps=8, lr=2e-3, batch_size=spec.finetune.batch_size)) as obj:
        study = optuna.create_study(directions=obj.directions, sampler=make_sampler("tpe", 0))
        obj.enqueue_baselines(study)
        study.optimize(obj, n_trials=9)
    assert [t.params for t in study.trials] == [t.params for t in cli.trials]
    assert [t.values for t in study.trials] == [t.values for t in cli.trials]
    assert [t.user_attrs.get("preset", "") for t in study.trials[:len(PRESETS)]] == list(PRESETS)


def test_enqueue_baselines_checks_the_study_and_enqueues_once(digits):
    with _objective(digits) as obj:
        study = optuna.create_study(directions=obj.directions)
        obj.enqueue_baselines(study)
        obj.enqueue_baselines(study)  # a second worker or a resume adds nothing
        assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == len(PRESETS)
        assert study.metric_names == ["accuracy", "size_bytes"]
        with pytest.raises(SpecError, match="directions"):
            obj.enqueue_baselines(optuna.create_study(directions=["minimize", "minimize"]))


def test_failed_trial_keeps_its_reason_and_optimize_goes_on_with_catch(digits, monkeypatch):
    with _objective(digits) as obj:
        study = optuna.create_study(directions=obj.directions)
        real = obj.score

        def flaky(plan, **kw):
            if study.trials[-1].number == 1:
                raise RuntimeError("export exploded")
            return real(plan, **kw)

        monkeypatch.setattr(obj, "score", flaky)
        study.optimize(obj, n_trials=3, catch=(Exception,))
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]
    assert study.trials[1].user_attrs["fail_reason"] == "RuntimeError: export exploded"


def test_export_rescores_the_trial_through_the_pipeline(tmp_path, digits):
    with _objective(digits, objectives=["accuracy", "size_bytes", "latency_ms"]) as obj:
        study = optuna.create_study(directions=obj.directions)
        obj.enqueue_baselines(study)
        study.optimize(obj, n_trials=2)
        result = obj.export(study, 1, tmp_path / "ship")
        again = obj.score(Plan.from_dict(study.trials[1].user_attrs["plan"]), score_artifact=True,
                          objectives=["accuracy"])
        with pytest.raises(SpecError, match="not empty"):
            obj.export(study, 1, tmp_path / "ship")
    card = result.card
    assert card["artifact"]["accuracy"] == again.metrics["accuracy"]  # the same pipeline, the same figure
    assert card["artifact"]["torch_onnx_top1_agreement"] >= 0.99
    assert (tmp_path / "ship" / "model.onnx").stat().st_size == card["artifact"]["bytes"]
    assert card["artifact"]["latency_speedup_paired"] > 0
    assert len(pareto_front(study)) >= 1
    assert write_report(study, tmp_path / "r.html").is_file()


def test_budgets_live_in_one_table():
    assert tuple(BudgetsSpec.__dataclass_fields__) == SEARCH_BUDGETS
    assert set(SLO.__dataclass_fields__) - {"p95"} == set(BUDGETS)
    assert constraint_values({"max_size_kb": 10.0, "min_accuracy": 0.9}, {"size_bytes": 12_000, "accuracy": 0.95}) \
        == {"max_size_kb": 2.0, "min_accuracy": pytest.approx(-0.05)}
    with pytest.raises(SpecError, match="max_size_kb"):
        check_budgets({"max_size_kb": -1})
    with pytest.raises(SpecError, match=r"\[budgets\]: budget min_accuracy"):
        demo_spec().replace(budgets=BudgetsSpec(min_accuracy=97.0))


def test_every_edgeslim_error_has_one_root():
    from edgeslim.spaces import EdgeslimError

    assert issubclass(ProfileError, SpecError) and issubclass(NoFitError, EdgeslimError)


def test_label_free_data_scores_agreement_with_the_dense_model(tmp_path, digits):
    from torch.utils.data import TensorDataset

    from edgeslim.search._cli_study import _front_table

    train = TensorDataset(digits.data.train.tensors[0])  # inputs only: no labels anywhere
    val = TensorDataset(digits.data.val.tensors[0])
    with CompressionObjective(digits.model, digits.example_input, train, val, objectives=["accuracy", "size_bytes"],
                              finetune=FinetuneConfig(steps=8, lr=2e-3, distill=1.0)) as obj:
        assert obj.workload.data.label_free and obj.workload.base_accuracy == 1.0  # the dense model agrees with itself
        study = optuna.create_study(directions=obj.directions)
        obj.enqueue_baselines(study)
        study.optimize(obj, n_trials=2)
        card = obj.export(study, 1, tmp_path / "ship").card
    assert study.user_attrs["label_free"] is True
    assert study.trials[0].values[0] == 1.0
    assert "agreement with the dense model" in study.trials[1].user_attrs["accuracy_method"]
    front = pareto_front(study)
    assert "'agree' is top-1 agreement" in _front_table(front, ["accuracy", "size_bytes"])
    assert card["data"]["label_free"] is True
    assert "agreement with the dense model (held-out, label-free)" in (tmp_path / "ship" / "MODEL_CARD.md").read_text()

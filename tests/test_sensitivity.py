"""The sensitivity sampler: per-knob profile, surrogate fit, MILP front, seeding a study."""

from __future__ import annotations

import io
import json
import math

import optuna
import pytest
from optuna.trial import TrialState

from edgeslim.objectives import FinetuneConfig, model_size_bytes
from edgeslim.search import (CompressionObjective, KnobEffect, SensitivityProfile, Surrogate, fit_surrogate, run_search, seed_study, sensitivity_profile, solve_front)
from edgeslim.search._sensitivity import DENSE_VALUE, plan_features, space_key
from edgeslim.search._spec import FinetuneSpec, ModelSpec
from edgeslim.search import demo_spec


@pytest.fixture(scope="module")
def objective(digits_cnn):
    w = digits_cnn  # the demo's trained CNN: sensitivities and drops mean something
    obj = CompressionObjective(w.model, w.example_input, w.data.train, w.data.val,
                               objectives=["accuracy", "size_bytes"], finetune=FinetuneConfig(steps=10))
    yield obj
    obj.close()


@pytest.fixture(scope="module")
def profile(objective):
    return sensitivity_profile(objective, samples=64)


def test_profile_covers_every_knob_value_with_exact_sizes(objective, profile):
    space = objective.space
    expected = {(k.param_name, float(c)) for k in space.knobs if len(k.choices) > 1
                for c in k.choices if float(c) != DENSE_VALUE[k.suffix]}
    assert {(e.param, e.value) for e in profile.effects} == expected
    assert profile.samples == 64 and profile.space_key == space_key(space)
    dense_size = model_size_bytes(space.realize(objective.model, space.dense_plan()))
    assert profile.dense_size == dense_size
    bits = next(e for e in profile.effects if e.kind == "bits")
    params = {**space.params_of(space.dense_plan()), bits.param: int(bits.value)}
    alone = model_size_bytes(space.realize(objective.model, space.plan_from_params(params)))
    assert bits.size_delta == alone - dense_size < 0
    assert all(math.isfinite(e.loss_delta) for e in profile.effects)
    # JSON (study user attribute) round trip, NaN included
    broken = SensitivityProfile(**{**profile.__dict__, "effects": profile.effects[:1] + (
        KnobEffect("x.bits", "x", "bits", 8.0, math.nan, math.nan, 0.0, 0.0),)})
    text = json.dumps(broken.to_dict())
    back = SensitivityProfile.from_dict(json.loads(text))
    assert back.effects[0] == broken.effects[0] and math.isnan(back.effects[1].loss_delta)


def test_a_knob_value_that_breaks_the_forward_is_named_and_left_out_of_the_solve(objective, monkeypatch):
    space = objective.space
    victim = next(k for k in space.knobs if k.suffix == "bits" and len(k.choices) > 1)
    real = type(space).realize

    def realize(self, base, plan, reduce_range=False):
        if plan.layer(victim.target).bits == min(victim.choices):
            raise RuntimeError("kernel missing")
        return real(self, base, plan, reduce_range)

    monkeypatch.setattr(type(space), "realize", realize)
    with pytest.warns(UserWarning, match=rf"{victim.param_name}={min(victim.choices)} \(RuntimeError: kernel missing"):
        prof = sensitivity_profile(objective, samples=32)
    monkeypatch.setattr(type(space), "realize", real)
    assert [(e.param, e.value) for e in prof.broken()] == [(victim.param_name, float(min(victim.choices)))]
    for p in solve_front(prof, Surrogate({}, 0, None), space):
        assert p.params[victim.param_name] != min(victim.choices)


def test_solve_meets_its_budgets_one_value_per_knob(objective, profile):
    space = objective.space
    lines: list[str] = []
    proposals = solve_front(profile, Surrogate({}, 0, None), space, size_grid=(0.3, 0.6, 2.0), log=lines.append)
    assert proposals, "the grid has feasible budgets"
    size_min = sum(min([0.0] + [e.size_delta for e in profile.effects if e.param == k.param_name])
                   for k in space.knobs if len(k.choices) > 1)
    knobs = {k.param_name for k in space.knobs if len(k.choices) > 1}
    for p in proposals:
        assert set(p.params) == knobs
        additive = sum(e.size_delta for e in profile.effects if p.params[e.param] == e.value)
        assert additive <= 0.3 * size_min + 1e-6  # saves at least the least the grid asks (30 %)
    # 200 % of the largest saving cannot be met: counted in one line, not raised
    assert len(lines) == 1 and "budgets have no plan within them" in lines[0] and "200%" in lines[0]
    # a profile of another space is refused
    other = SensitivityProfile(**{**profile.__dict__, "space_key": "0" * 12})
    with pytest.raises(Exception, match="another space"):
        solve_front(other, Surrogate({}, 0, None), space)


def test_surrogate_weights_fit_the_presets(objective, profile):
    study = optuna.create_study(directions=objective.directions)
    objective.enqueue_baselines(study)
    study.optimize(objective, n_trials=6)
    s = fit_surrogate(profile, study)
    assert s.fitted_on == 5  # every preset but dense
    assert all(w >= 0 for w in s.weights.values())
    assert set(s.weights) <= {"sparsity", "rank", "bits8", "bits4"}
    assert s.default == max(s.weights.values()) > 0  # a trained model loses accuracy somewhere
    # the fitted weights reproduce the least-squares prediction of one preset
    t = study.trials[1]  # uniform-int8
    f = plan_features(profile, t.params)
    assert set(f) == {"bits8"}


def test_seed_study_enqueues_solved_plans_once_and_reuses_the_stored_profile(objective):
    study = optuna.create_study(directions=objective.directions)
    objective.enqueue_baselines(study)
    study.optimize(objective, n_trials=6)
    lines: list[str] = []
    first = seed_study(study, objective, n_plans=3, samples=32, log=lines.append)
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert first.enqueued == len(waiting) == 3
    assert any(k.startswith("sensitivity:") for k in study.user_attrs)
    second = seed_study(study, objective, n_plans=3, samples=32, log=lines.append)
    assert any("reused the profile" in line for line in lines)
    assert second.profile == first.profile
    study.optimize(objective, n_trials=3 + second.enqueued)
    proposed = [t for t in study.trials if t.user_attrs.get("proposed_by") == "surrogate"]
    assert len(proposed) == 3 + second.enqueued
    keys = [json.dumps(t.params, sort_keys=True) for t in proposed]
    assert len(set(keys)) == len(keys)  # never the same plan twice
    for t in proposed:  # the exact size predicted is the size measured
        assert t.user_attrs["predicted_size_bytes"] == pytest.approx(t.values[1], abs=0.1)
    with pytest.raises(Exception, match="n_plans must be >= 1"):
        seed_study(study, objective, n_plans=0)


def test_cli_search_with_the_sensitivity_sampler(tmp_path):
    spec = demo_spec().replace(trials=10, out_dir=str(tmp_path / "s"), sampler="sensitivity",
                               model=ModelSpec(builtin="digits-cnn", train_epochs=3),
                               finetune=FinetuneSpec(steps=5, lr=2e-3, batch_size=64))
    err = io.StringIO()
    result = run_search(spec, stream=err)
    trials = result.study.trials
    assert len(trials) == 10
    assert [t.user_attrs.get("preset") for t in trials[:6]] == ["dense", "uniform-int8", "uniform-sparsity-25",
                                                                "uniform-sparsity-50-int8", "uniform-sparsity-75-int8",
                                                                "uniform-rank-50"]
    assert all(t.user_attrs.get("proposed_by") == "surrogate" for t in trials[6:10])
    log = err.getvalue()
    assert "sensitivity: " in log and "MILP solved" in log and "Spearman" in log
    html = result.report_path.read_text()
    assert "Sensitivity: accuracy drop (pp)" in html and "Sensitivity-seeded search" in html
    # a resumed run does not seed again: the sampler goes on
    again = run_search(spec.replace(trials=2), stream=io.StringIO())
    assert len(again.study.trials) == 12
    assert not any(t.user_attrs.get("proposed_by") for t in again.study.trials[10:])


def test_reseed_callback_solves_again_within_the_budget(objective):
    from edgeslim.search import ReseedCallback

    study = optuna.create_study(directions=objective.directions)
    objective.enqueue_baselines(study)
    study.optimize(objective, n_trials=6)
    seed_study(study, objective, n_plans=2, samples=32)
    cb = ReseedCallback(objective, every=2, n_plans=2, stop_at=14)
    study.optimize(objective, n_trials=8, callbacks=[cb])
    assert cb.rounds >= 1
    assert len(study.trials) == 14  # nothing left waiting past the budget
    assert not study.get_trials(states=(TrialState.WAITING,))
    proposed = [t for t in study.trials if t.user_attrs.get("proposed_by") == "surrogate"]
    assert len(proposed) == 2 + 2 * cb.rounds
    assert study.user_attrs["surrogate"]["fitted_on"] > 5  # refitted on more than the presets

"""Running a study: Optuna multi-objective search over a compression space, with baselines."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import optuna
import torch
from optuna.trial import TrialState

from edgeslim.objectives import (DEVICES_DIR, OBJECTIVES, Candidate, DeviceProfile, EvalContext, FinetuneConfig,
                                 Objective, export_onnx, load_device)
from edgeslim.search._front import front_entries, write_front
from edgeslim.search._progress import Progress
from edgeslim.search._spec import StudySpec, spec_fingerprint
from edgeslim.search._workloads import Workload, load_workload
from edgeslim.spaces import CompressionSpace, Plan, SpecError

__all__ = ["PRESETS", "SearchResult", "make_sampler", "run_search", "BUDGET_METRICS", "score_plan", "is_dense",
           "DENSE_POLICY", "study_space"]

# name -> (sparsity, rank ratio, bits): enqueued first so every study holds its own baselines
PRESETS: dict[str, tuple[float, float, int]] = {
    "dense": (0.0, 1.0, 32),
    "uniform-int8": (0.0, 1.0, 8),
    "uniform-sparsity-25": (0.25, 1.0, 32),
    "uniform-sparsity-50-int8": (0.5, 1.0, 8),
    # the aggressive end: resnet18 on digits (3x32x32) kept its accuracy there after a refine
    # and ran 10.8x faster than dense, a plan 16 TPE trials had never drawn
    "uniform-sparsity-75-int8": (0.75, 1.0, 8),
    "uniform-rank-50": (0.0, 0.5, 32),
}

# budget -> (objective it bounds, sign, scale): constraint = sign * (value * scale - bound)
BUDGET_METRICS: dict[str, tuple[str, float, float]] = {
    "max_latency_ms": ("latency_ms", 1.0, 1.0),
    "max_size_kb": ("size_bytes", 1.0, 1e-3),
    "max_energy_mj": ("energy_mj", 1.0, 1.0),
    "min_accuracy": ("accuracy", -1.0, 1.0),
}


@dataclasses.dataclass
class SearchResult:
    """What a finished ``run_search`` returns.

    Example:
        >>> result = run_search(demo_spec().replace(trials=3))  # doctest: +SKIP
        >>> result.report_path.name
        'report.html'
    """

    study: optuna.Study
    space: CompressionSpace
    workload: Workload
    front: list[dict[str, Any]]
    out_dir: Path
    report_path: Path
    objective_names: list[str]


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """Optuna sampler by name: ``tpe`` (Optuna's default), ``nsga2`` or ``random``; seeded.

    Example:
        >>> type(make_sampler("nsga2", 0)).__name__
        'NSGAIISampler'
    """
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise SpecError(f"unknown sampler {name!r}; choose one of ['tpe', 'nsga2', 'random']")


def ordered_objectives(names: list[str]) -> list[Objective]:
    """Objectives in evaluation order: those that change the candidate (fine-tuning) first,
    then dependencies before their dependents, keeping the spec's order otherwise.

    Example:
        >>> [o.name for o in ordered_objectives(["energy_mj", "latency_ms", "accuracy"])]
        ['accuracy', 'latency_ms', 'energy_mj']
    """
    objs = [OBJECTIVES[n]() for n in names]
    return sorted(objs, key=lambda o: (not o.mutates, len(o.requires)))


def spec_device(spec: StudySpec, devices_dir: Path = DEVICES_DIR) -> DeviceProfile:
    """The device profile a spec names; ``[device] threads`` applies to ``local`` only, since a
    calibrated profile carries the thread count it was measured with."""
    return load_device(spec.device.name, spec.device.threads if spec.device.name == "local" else None, devices_dir)


def study_space(spec: StudySpec, workload: Workload, profile: DeviceProfile,
                study: optuna.Study | None = None) -> CompressionSpace:
    """The compression space of a study: the spec's rules, and pruned channel counts rounded
    to ``[space] channel_multiple`` (0: the device's probed channel block). A study keeps the
    multiple it was searched with (user attribute ``channel_multiple``), so export and refine
    realize its plans as the search did, on any machine."""
    multiple = study.user_attrs.get("channel_multiple") if study is not None else None
    if multiple is None:
        multiple = spec.space.channel_multiple or profile.channel_multiple
    return CompressionSpace.build(workload.model, workload.example_input, spec.space.rule_set(), int(multiple))


def _open_study(spec: StudySpec, objectives: list[str], workload: Workload) -> optuna.Study:
    directions = [OBJECTIVES[n].direction for n in objectives]
    fingerprint = spec_fingerprint(spec)
    sampler = make_sampler(spec.sampler, spec.seed)
    try:
        study = optuna.load_study(study_name=spec.name, storage=spec.storage_url, sampler=sampler)
    except KeyError:
        study = None
    if study is not None:
        old = study.user_attrs.get("fingerprint")
        if old is not None and old != fingerprint:
            raise SpecError(f"study {spec.name!r} in {spec.storage_url} was created from a different spec "
                            "(model, data, space, objectives or fine-tune differ); resume it with the "
                            "same spec, or give a new study name / --out")
        if study.user_attrs.get("base_model_hash") not in (None, workload.model_hash):
            raise SpecError(f"study {spec.name!r} was searched on a different base model "
                            f"({study.user_attrs.get('base_model_hash')} != {workload.model_hash}); "
                            "use a new study name")
        return study
    study = optuna.create_study(study_name=spec.name, storage=spec.storage_url, directions=directions,
                                sampler=sampler)
    with warnings.catch_warnings():  # experimental in Optuna, stable enough for the dashboard
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(objectives)
    study.set_user_attr("fingerprint", fingerprint)
    study.set_user_attr("spec", spec.to_dict())
    study.set_user_attr("base_model_hash", workload.model_hash)
    study.set_user_attr("split_hash", workload.split_hash)
    study.set_user_attr("workload", workload.description)
    return study


def _enqueue_presets(study: optuna.Study, space: CompressionSpace) -> None:
    if study.user_attrs.get("presets_enqueued"):
        return
    seen: set[str] = set()
    for name, (s, r, b) in PRESETS.items():
        params = space.params_of(space.uniform_plan(sparsity=s, rank=r, bits=b))
        key = json.dumps(params, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        study.enqueue_trial(params, user_attrs={"preset": name}, skip_if_exists=False)
    study.set_user_attr("presets_enqueued", True)


def is_dense(plan: Plan) -> bool:
    """Whether ``plan`` changes nothing: no pruning, full rank, 32-bit everywhere.

    Example:
        >>> is_dense(Plan())
        True
    """
    return all(s == 0 for _, s in plan.groups) and all(lp.rank == 1.0 and lp.bits == 32 for _, lp in plan.layers)


def score_plan(plan: Plan, space: CompressionSpace, workload: Workload, objectives: list[Objective],
               ctx: EvalContext) -> Candidate:
    """The one trial pipeline: realize ``plan``, then run ``objectives`` in dependency order
    (accuracy fine-tunes the candidate first, so everything after scores the fine-tuned model
    and its artifact). The search, the refine stage and every preset go through it.

    The dense plan is the user's model itself and is never fine-tuned (``DENSE_POLICY``): a
    fine-tune of a converged model only drifts it, and every "drop vs dense" is measured
    against that drifted figure otherwise.
    """
    space.check(plan)
    torch.manual_seed(ctx.seed)
    if is_dense(plan):
        ctx = dataclasses.replace(ctx, finetune=dataclasses.replace(ctx.finetune, steps=0))
    candidate = Candidate(plan, space.realize(workload.model, plan, reduce_range=ctx.device.int8_reduce_range))
    for obj in objectives:
        value = obj.evaluate(candidate, ctx)
        if not math.isfinite(value):
            raise ValueError(f"objective {obj.name} returned {value!r}")
        candidate.metrics[obj.name] = value
    return candidate


DENSE_POLICY = "the dense baseline is the user's model as given: zero fine-tune steps"


def _evaluate(trial: optuna.Trial, space: CompressionSpace, workload: Workload,
              objectives: list[Objective], ctx: EvalContext, budgets: dict[str, float],
              names: list[str]) -> list[float]:
    plan = space.plan_from_params(trial.params)
    trial.set_user_attr("plan", plan.to_dict())
    trial.set_user_attr("plan_summary", plan.summary())
    candidate = score_plan(plan, space, workload, objectives, ctx)
    for key, value in candidate.metrics.items():
        trial.set_user_attr(key, value)
    constraints = {}
    for budget, bound in budgets.items():
        metric, sign, scale = BUDGET_METRICS[budget]
        if metric in candidate.metrics:
            constraints[budget] = sign * (candidate.metrics[metric] * scale - bound)
            trial.set_constraint(budget, constraints[budget])
    trial.set_user_attr("constraints", constraints)
    return [candidate.metrics[n] for n in names]


def run_search(spec: StudySpec, stream: TextIO | None = None, log: Callable[[str], None] | None = None,
               devices_dir: Path = DEVICES_DIR) -> SearchResult:
    """Run (or resume) the study a spec describes, then write pareto.json/csv and report.html.

    Each call adds ``spec.trials`` trials; the first run also enqueues the dense baseline
    and uniform presets. A trial that raises or yields a non-finite value is marked failed
    with the reason in its ``fail_reason`` user attribute; the study goes on.
    """
    stream = stream if stream is not None else sys.stderr
    say = log or (lambda msg: print(msg, file=stream))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out_dir = spec.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    profile = spec_device(spec, devices_dir)
    workload = load_workload(spec, out_dir, say)
    objectives = ordered_objectives(spec.objectives)
    study = _open_study(spec, list(spec.objectives), workload)
    space = study_space(spec, workload, profile, study)
    study.set_user_attr("channel_multiple", space.channel_multiple)
    study.set_user_attr("dense_policy", DENSE_POLICY)
    study.set_user_attr("device", profile.describe())
    _enqueue_presets(study, space)
    budgets = spec.budgets.active()
    names = list(spec.objectives)
    say(f"study {spec.name!r}: {workload.description}, base accuracy {workload.base_accuracy:.4f}; "
        f"{len(space.distributions())} knobs over {len(space.layers)} layers / {len(space.groups)} "
        f"pruning groups" + (f" (kept channels rounded to multiples of {space.channel_multiple})"
                             if space.channel_multiple > 1 else "") + f"; storage {spec.storage_url}\n{profile.describe()}"
        + ("; accuracy scored on each trial's exported ONNX artifact" if spec.finetune.score == "artifact" else ""))
    ctx = EvalContext(
        data=workload.data, example_input=workload.example_input,
        finetune=FinetuneConfig(steps=spec.finetune.steps, lr=spec.finetune.lr,
                                batch_size=spec.finetune.batch_size),
        device=profile, seed=spec.seed, score_artifact=spec.finetune.score == "artifact",
    )
    progress = Progress(spec.trials, "trials", stream=stream)
    progress.update(0, "starting")
    distributions = space.distributions()
    with tempfile.TemporaryDirectory(prefix="edgeslim-") as tmp:
        ctx.workdir = Path(tmp)
        if "latency_ms" in names and not profile.predicts_latency:
            # every measured candidate is timed side by side with the dense model's artifact
            ctx.reference_artifact = export_onnx(workload.model, workload.example_input,
                                                 ctx.workdir / "dense-reference.onnx")
        for done in range(1, spec.trials + 1):
            trial = study.ask(distributions)
            t0 = time.perf_counter()
            try:
                values = _evaluate(trial, space, workload, objectives, ctx, budgets, names)
            except Exception as e:  # recorded on the trial; the study goes on
                trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}")
                trial.set_user_attr("seconds", time.perf_counter() - t0)
                study.tell(trial, state=TrialState.FAIL)
                note = f"trial {trial.number} failed: {type(e).__name__}: {str(e)[:80]}"
            else:
                trial.set_user_attr("seconds", time.perf_counter() - t0)
                study.tell(trial, values)
                note = f"front {len(study.best_trials)}"
            progress.update(done, note)
    front = front_entries(study, names)
    write_front(front, out_dir)
    from edgeslim.search._report import build_report_data, write_report

    report = write_report(build_report_data(study, names, front, spec.budgets.active(), f"edgeslim study {spec.name}"),
                          out_dir / "report.html")
    return SearchResult(study, space, workload, front, out_dir, report, names)

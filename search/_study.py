"""Running a study from a spec: the CLI's search, on the Python API's objective."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import optuna
from optuna.trial import FrozenTrial, TrialState

from edgeslim.objectives import DEVICES_DIR, DeviceProfile, FinetuneConfig, load_device
from edgeslim.search._front import front_entries, write_front
from edgeslim.search._objective import CompressionObjective
from edgeslim.search._progress import Progress
from edgeslim.search._registry import SAMPLERS
from edgeslim.search._spec import StudySpec, spec_fingerprint
from edgeslim.search._workloads import Workload, load_workload
from edgeslim.spaces import CompressionSpace, SpecError

__all__ = ["SAMPLERS", "SearchResult", "make_sampler", "run_search", "spec_device", "spec_objective",
           "study_storage"]


@dataclasses.dataclass
class SearchResult:
    """What a finished ``run_search`` returns.

    Example:
        >>> result = run_search(demo_spec().replace(trials=3))  # doctest: +SKIP
        >>> result.report_path.name  # doctest: +SKIP
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
    """Optuna sampler by name: ``tpe`` (Optuna's default), ``nsga2``, ``random`` or
    ``sensitivity`` (TPE; :func:`run_search` seeds the study with a solved front first, see
    :func:`edgeslim.search.seed_study`); seeded.

    Example:
        >>> type(make_sampler("nsga2", 0)).__name__
        'NSGAIISampler'
    """
    if name in ("tpe", "sensitivity"):
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise SpecError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")


def spec_device(spec: StudySpec, devices_dir: Path = DEVICES_DIR) -> DeviceProfile:
    """The device profile a spec names; ``[device] threads`` applies to ``local`` only, since a
    calibrated profile carries the thread count it was measured with."""
    return load_device(spec.device.name, spec.device.threads if spec.device.name == "local" else None, devices_dir)


def spec_objective(spec: StudySpec, workload: Workload, profile: DeviceProfile,
                   study: optuna.Study | None = None) -> CompressionObjective:
    """The objective a spec describes, on an already built workload. A study keeps the channel
    multiple it was searched with (user attribute ``channel_multiple``), so export and refine
    realize its plans as the search did, on any machine."""
    multiple = study.user_attrs.get("channel_multiple") if study is not None else None
    if multiple is None:
        multiple = spec.space.channel_multiple
    names = list(study.metric_names or spec.objectives) if study is not None else list(spec.objectives)
    return CompressionObjective.from_workload(
        workload, profile, objectives=names,
        finetune=FinetuneConfig(steps=spec.finetune.steps, lr=spec.finetune.lr, batch_size=spec.finetune.batch_size,
                                norm=spec.finetune.norm, dropout=spec.finetune.dropout,  # type: ignore[arg-type]
                                distill=spec.finetune.distill,
                                temperature=spec.finetune.temperature),
        rules=spec.space.rule_set(), budgets=spec.budgets.active(), seed=spec.seed,
        score_artifact=spec.finetune.score == "artifact", channel_multiple=int(multiple))


def study_space(spec: StudySpec, workload: Workload, profile: DeviceProfile,
                study: optuna.Study | None = None) -> CompressionSpace:
    """The compression space of a study (see :func:`spec_objective`)."""
    return spec_objective(spec, workload, profile, study).space


def study_storage(spec: StudySpec) -> str | optuna.storages.BaseStorage:
    """The spec's storage; RDB storage (SQLite, PostgreSQL, MySQL) with heartbeats: a trial whose
    worker stops beating for ``2 x heartbeat_s`` (kill -9, a lost machine) is marked failed by
    the next trial any worker starts, and its plan is enqueued again once
    (``RetryHeartbeatStaleTrialCallback``; the copy's system attribute ``failed_trial`` names it).

    Example:
        >>> from edgeslim.search import demo_spec
        >>> type(study_storage(demo_spec().replace(storage="sqlite:///:memory:"))).__name__
        'RDBStorage'
    """
    url = spec.storage_url
    if not url.startswith(("sqlite:", "postgresql", "mysql")):
        return url
    import warnings

    with warnings.catch_warnings():  # heartbeats are experimental in Optuna; what we use of them is stable
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=spec.heartbeat_s, grace_period=2 * spec.heartbeat_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))


def _open_study(spec: StudySpec, objective: CompressionObjective,
                storage: str | optuna.storages.BaseStorage) -> optuna.Study:
    fingerprint = spec_fingerprint(spec)
    sampler = make_sampler(spec.sampler, spec.seed)
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler)
    except KeyError:
        study = None
    if study is not None:
        old = study.user_attrs.get("fingerprint")
        if old is not None and old != fingerprint:
            raise SpecError(f"study {spec.name!r} in {spec.storage_url} was created from a different spec "
                            "(model, data, space, objectives or fine-tune differ); resume it with the "
                            "same spec, or give a new study name / --out")
        return study
    study = optuna.create_study(study_name=spec.name, storage=storage, directions=objective.directions,
                                sampler=sampler)
    study.set_user_attr("fingerprint", fingerprint)
    study.set_user_attr("spec", spec.to_dict())
    return study


def run_search(spec: StudySpec, stream: TextIO | None = None, log: Callable[[str], None] | None = None,
               devices_dir: Path = DEVICES_DIR) -> SearchResult:
    """Run (or resume) the study a spec describes, then write pareto.json/csv and report.html.

    Builds the spec's :class:`CompressionObjective` and runs ``study.optimize`` on it: each
    call adds ``spec.trials`` trials; the first run also enqueues the dense baseline and the
    uniform presets. A trial that raises is marked failed with the reason in its
    ``fail_reason`` user attribute; the study goes on. With the ``sensitivity`` sampler the
    presets run first, then :func:`edgeslim.search.seed_study` enqueues a solved front (once per
    study) and TPE continues.

    Example:
        >>> result = run_search(demo_spec().replace(trials=3))  # doctest: +SKIP
    """
    stream = stream if stream is not None else sys.stderr
    say = log or (lambda msg: print(msg, file=stream))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out_dir = spec.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    profile = spec_device(spec, devices_dir)
    workload = load_workload(spec, out_dir, say)
    storage = study_storage(spec)
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage)
    except KeyError:
        study = None
    objective = spec_objective(spec, workload, profile, study)
    study = _open_study(spec, objective, storage)
    objective.enqueue_baselines(study)
    names = objective.metric_names
    say(f"study {spec.name!r}: {objective.describe()}; storage {spec.storage_url}\n{profile.describe()}"
        + ("; accuracy scored on each trial's exported ONNX artifact" if spec.finetune.score == "artifact" else ""))
    progress = Progress(spec.trials, "trials", stream=stream)
    progress.update(0, "starting")
    done = [0]

    def report_progress(study: optuna.Study, trial: FrozenTrial) -> None:
        done[0] += 1
        if trial.state == TrialState.COMPLETE:
            note = f"front {len(study.best_trials)}"
        else:
            note = f"trial {trial.number} failed: {str(trial.user_attrs.get('fail_reason', ''))[:90]}"
        progress.update(done[0], note)

    # a failed trial is recorded (fail_reason) and reported by the progress line, not re-logged by Optuna
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with objective:
            if spec.sampler == "sensitivity":
                from edgeslim.search._sensitivity import optimize_seeded

                optimize_seeded(study, objective, spec.trials, callbacks=[report_progress], log=say, stream=stream)
            else:
                study.optimize(objective, n_trials=spec.trials, catch=(Exception,), callbacks=[report_progress])
    finally:
        optuna.logging.set_verbosity(verbosity)
    front = front_entries(study, names)
    write_front(front, out_dir)
    if spec.sampler == "sensitivity":
        from edgeslim.search._sensitivity import surrogate_quality

        q = surrogate_quality(study, objective.space, [e["trial"] for e in front])
        if q is not None:
            say(f"surrogate: Spearman {q['spearman'] if q['spearman'] is None else round(q['spearman'], 3)} between "
                f"predicted and measured accuracy drop over {q['trials']} trials; {q['front_proposed']} of the "
                f"{q['front']} front variants were proposed by the solve")
    from edgeslim.search._report import build_report_data, render_report

    report = render_report(build_report_data(study, names, front, spec.budgets.active(), f"edgeslim study {spec.name}"),
                          out_dir / "report.html")
    return SearchResult(study, objective.space, workload, front, out_dir, report, names)

"""Running a study from a spec: the CLI's search, on the Python API's objective."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
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
from edgeslim.search._storage import open_storage, shared_storage, shown_url, study_lock
from edgeslim.search._workloads import Workload, load_workload
from edgeslim.spaces import CompressionSpace, SpecError

__all__ = ["SAMPLERS", "SearchResult", "StopRequest", "check_finetune_device", "make_sampler", "run_search",
           "spec_device", "spec_objective", "study_storage"]


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
    # 130 / 143 when SIGINT / SIGTERM stopped the search early (front and report cover what completed)
    exit_code: int = 0


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
    calibrated profile carries the thread count it was measured with.

    Example:
        >>> from edgeslim.search import demo_spec
        >>> spec_device(demo_spec()).name
        'local'
    """
    return load_device(spec.device.name, spec.device.threads if spec.device.name == "local" else None, devices_dir)


def spec_objective(spec: StudySpec, workload: Workload, profile: DeviceProfile,
                   study: optuna.Study | None = None) -> CompressionObjective:
    """The objective a spec describes, on an already built workload. A study keeps the channel
    multiple it was searched with (user attribute ``channel_multiple``) and its pruning criterion
    (``pruning``; a study from before the option was searched with ``"magnitude"``), so export
    and refine realize its plans as the search did, on any machine.

    Example:
        >>> from edgeslim.search import demo_spec, load_workload
        >>> spec = demo_spec()
        >>> workload = load_workload(spec, spec.output_dir, log=lambda m: None)  # doctest: +SKIP
        >>> spec_objective(spec, workload, spec_device(spec)).metric_names  # doctest: +SKIP
        ['accuracy', 'size_bytes', 'latency_ms', 'energy_mj']
    """
    multiple = study.user_attrs.get("channel_multiple") if study is not None else None
    if multiple is None:
        multiple = spec.space.channel_multiple
    pruning = spec.space.pruning
    if study is not None and "base_model_hash" in study.user_attrs:  # a study that has been searched
        pruning = study.user_attrs.get("pruning", "magnitude")
    names = list(study.metric_names or spec.objectives) if study is not None else list(spec.objectives)
    return CompressionObjective.from_workload(
        workload, profile, objectives=names,
        finetune=FinetuneConfig(steps=spec.finetune.steps, lr=spec.finetune.lr, batch_size=spec.finetune.batch_size,
                                norm=spec.finetune.norm, dropout=spec.finetune.dropout,  # type: ignore[arg-type]
                                distill=spec.finetune.distill, temperature=spec.finetune.temperature,
                                device=spec.finetune.device),  # type: ignore[arg-type]
        rules=spec.space.rule_set(), budgets=spec.budgets.active(), seed=spec.seed,
        score_artifact=spec.finetune.score == "artifact", channel_multiple=int(multiple), pruning=str(pruning))


def study_space(spec: StudySpec, workload: Workload, profile: DeviceProfile,
                study: optuna.Study | None = None) -> CompressionSpace:
    """The compression space of a study (see :func:`spec_objective`)."""
    return spec_objective(spec, workload, profile, study).space


def study_storage(spec: StudySpec) -> str | optuna.storages.BaseStorage:
    """The spec's storage (see :func:`edgeslim.search._storage.open_storage`): RDB storage with
    heartbeats; a storage that cannot be reached is one line, exit 2 from the CLI.

    Example:
        >>> from edgeslim.search import demo_spec
        >>> type(study_storage(demo_spec().replace(storage="sqlite:///:memory:"))).__name__
        'RDBStorage'
    """
    return open_storage(spec.storage_url, spec.heartbeat_s)


def _load(spec: StudySpec, storage: str | optuna.storages.BaseStorage) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=spec.name, storage=storage, sampler=make_sampler(spec.sampler, spec.seed))
    except KeyError:
        return None


def _open_study(spec: StudySpec, objective: CompressionObjective, storage: str | optuna.storages.BaseStorage,
                study: optuna.Study | None) -> optuna.Study:
    fingerprint = spec_fingerprint(spec)
    if study is not None:
        old = study.user_attrs.get("fingerprint")
        if old is not None and old != fingerprint:
            raise SpecError(f"study {spec.name!r} in {shown_url(spec.storage_url)} was created from a different spec "
                            "(model, data, space, objectives or fine-tune differ); resume it with the "
                            "same spec, or give a new study name / --out")
        return study
    study = optuna.create_study(study_name=spec.name, storage=storage, directions=objective.directions,
                                sampler=make_sampler(spec.sampler, spec.seed))
    study.set_user_attr("fingerprint", fingerprint)
    study.set_user_attr("spec", spec.to_dict())
    return study


def check_finetune_device(spec: StudySpec) -> None:
    """Refuse ``[finetune] device = "cuda"`` on a machine without CUDA before any training.

    Example:
        >>> from edgeslim.search import demo_spec
        >>> check_finetune_device(demo_spec())
    """
    from edgeslim.objectives import finetune_device
    from edgeslim.spaces import ObjectiveError

    try:
        finetune_device(spec.finetune.device)
    except ObjectiveError as e:
        raise SpecError(f"[finetune] {e}") from None


class StopRequest:
    """SIGINT / SIGTERM during a search: the first lets the running trial finish, then the
    search stops, writes its front and report for what completed and exits 130 / 143; a second
    aborts the running trial (it is stored as failed). Forwards each signal to the local workers
    it is given. Installed only in the main thread (signals cannot be caught elsewhere).

    Example:
        >>> stop = StopRequest(print)
        >>> stop.signum is None
        True
    """

    def __init__(self, say: Callable[[str], None]) -> None:
        self.signum: int | None = None
        self.children: list[subprocess.Popen[bytes]] = []
        self._say = say
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame: Any) -> None:
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)
        if self.signum is None:
            self.signum = signum
            self._say(f"\n{signal.Signals(signum).name}: finishing the running trial, then writing the front "
                      "(send it again to abort the trial)")
            return
        raise KeyboardInterrupt

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.signum is not None:
            study.stop()

    @property
    def exit_code(self) -> int:
        """128 + the signal number (130 for SIGINT, 143 for SIGTERM); 0 when none came."""
        return 128 + self.signum if self.signum is not None else 0


def finished_trials(study: optuna.Study) -> int:
    """Trials of ``study`` that ended (complete, failed or pruned), whichever worker ran them.

    Example:
        >>> finished_trials(optuna.create_study())
        0
    """
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())


def _shares(trials: int, jobs: int) -> list[int]:
    return [n for n in (trials // jobs + (1 if i < trials % jobs else 0) for i in range(jobs)) if n > 0]


def _start_workers(spec: StudySpec, shares: Sequence[int], devices_dir: Path, torch_threads: int,
                   out_dir: Path) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """Worker processes for ``shares[1:]`` (the calling process runs ``shares[0]``), each in its
    own session (a terminal's Ctrl-C reaches the main process, which forwards it once)."""
    spec_file = out_dir / f".worker-spec-{os.getpid()}.json"
    spec_file.write_text(json.dumps(spec.to_dict()))
    started = []
    for k, share in enumerate(shares[1:], start=1):
        log_path = out_dir / f"worker-{k}.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgeslim.search.cli", "worker", str(spec_file), "--trials", str(share),
                 "--devices-dir", str(devices_dir), "--torch-threads", str(torch_threads)],
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        started.append((proc, log_path))
    return started


def run_search(spec: StudySpec, stream: TextIO | None = None, log: Callable[[str], None] | None = None,
               devices_dir: Path = DEVICES_DIR, jobs: int = 1, torch_threads: int | None = None,
               role: str = "search") -> SearchResult:
    """Run (or resume) the study a spec describes, then write pareto.json/csv and report.html.

    Builds the spec's :class:`CompressionObjective` and runs ``study.optimize`` on it: each
    call adds ``spec.trials`` trials; the first run also enqueues the dense baseline and the
    uniform presets. A trial that raises is marked failed with the reason in its
    ``fail_reason`` user attribute; the study goes on. With the ``sensitivity`` sampler the
    presets run first, then :func:`edgeslim.search.seed_study` enqueues a solved front (once per
    study) and TPE continues.

    ``jobs`` > 1 starts that many workers on this machine (this process and ``jobs - 1``
    ``edgeslim worker`` processes) sharing ``spec.trials``, each fine-tuning with
    ``torch_threads`` threads (default: cores / jobs); latency timings run one at a time on the
    machine (``edgeslim.objectives._machine``). ``role="worker"`` joins (or creates) the study,
    runs its trials and writes no front. SIGINT / SIGTERM: see :class:`StopRequest`.

    Example:
        >>> result = run_search(demo_spec().replace(trials=3))  # doctest: +SKIP
    """
    stream = stream if stream is not None else sys.stderr
    say = log or (lambda msg: print(msg, file=stream))
    if jobs < 1:
        raise SpecError(f"jobs must be >= 1, got {jobs}")
    if jobs > 1 and not shared_storage(spec.storage_url):
        raise SpecError(f"--jobs {jobs} needs storage that several processes share (a SQLite file or PostgreSQL), "
                        f"not {shown_url(spec.storage_url)}; leave --storage out for SQLite in the study folder")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    check_finetune_device(spec)
    out_dir = spec.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    profile = spec_device(spec, devices_dir)
    storage = study_storage(spec)  # before training: a storage that cannot be reached fails at once
    if torch_threads is None and jobs > 1:
        torch_threads = max(1, (os.cpu_count() or 1) // jobs)
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    workload = load_workload(spec, out_dir, say)
    with study_lock(spec.storage_url, spec.name):  # created, and baselines enqueued, once across workers
        study = _load(spec, storage)
        objective = spec_objective(spec, workload, profile, study)
        study = _open_study(spec, objective, storage, study)
        objective.enqueue_baselines(study)
    names = objective.metric_names
    shares = _shares(spec.trials, jobs)
    say(f"study {spec.name!r}: {objective.describe()}; storage {shown_url(spec.storage_url)}\n{profile.describe()}"
        + ("; accuracy scored on each trial's exported ONNX artifact" if spec.finetune.score == "artifact" else "")
        + (f"\n{len(shares)} workers on this machine ({', '.join(map(str, shares))} trials each), "
           f"{torch_threads} fine-tune thread(s) each; latency timings run one at a time, the other workers' "
           f"fine-tune steps waiting meanwhile; logs {out_dir}/worker-*.log" if len(shares) > 1 else ""))
    progress = Progress(spec.trials, "trials", stream=stream)
    progress.update(0, "starting")
    done_before, mine = finished_trials(study), [0]

    def done() -> int:  # with local workers: the whole study's progress since this run began
        return min(finished_trials(study) - done_before, spec.trials) if len(shares) > 1 else mine[0]

    def report_progress(study: optuna.Study, trial: FrozenTrial) -> None:
        mine[0] += 1
        if trial.state == TrialState.COMPLETE:
            note = f"front {len(study.best_trials)}"
        else:
            note = f"trial {trial.number} failed: {str(trial.user_attrs.get('fail_reason', ''))[:90]}"
        progress.update(done(), note)

    # a failed trial is recorded (fail_reason) and reported by the progress line, not re-logged by Optuna
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    workers: list[tuple[subprocess.Popen[bytes], Path]] = []
    with StopRequest(say) as stop:
        try:
            if len(shares) > 1:
                workers = _start_workers(spec, shares, devices_dir, torch_threads or 1, out_dir)
                stop.children = [p for p, _ in workers]
            with objective:
                if spec.sampler == "sensitivity":
                    from edgeslim.search._sensitivity import optimize_seeded

                    optimize_seeded(study, objective, shares[0], callbacks=[report_progress, stop], log=say,
                                    stream=stream, lock=lambda: study_lock(spec.storage_url, spec.name),
                                    stopped=lambda: stop.signum is not None)
                else:
                    study.optimize(objective, n_trials=shares[0], catch=(Exception,),
                                   callbacks=[report_progress, stop])
            while any(p.poll() is None for p, _ in workers):  # the other workers' trials
                time.sleep(1.0)
                progress.update(done(), f"front {len(study.best_trials)}")
        except KeyboardInterrupt:
            stop.signum = stop.signum or signal.SIGINT
            say("aborted the running trial (stored as failed)")
            for p, _ in workers:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=60)
        finally:
            optuna.logging.set_verbosity(verbosity)
            with contextlib.suppress(FileNotFoundError):
                (out_dir / f".worker-spec-{os.getpid()}.json").unlink()
    for p, log_path in workers:
        if p.returncode not in (0, 130, 143, -signal.SIGINT, -signal.SIGTERM):
            say(f"a worker exited with code {p.returncode}; its log: {log_path}")
    if role == "worker":
        return SearchResult(study, objective.space, workload, [], out_dir, out_dir / "report.html", names,
                            stop.exit_code)
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
    return SearchResult(study, objective.space, workload, front, out_dir, report, names, stop.exit_code)

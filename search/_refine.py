"""The refine stage: the front, fine-tuned longer and re-scored on the exported artifact."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from edgeslim.objectives import DEVICES_DIR
from edgeslim.search._export import open_study_dir
from edgeslim.search._front import front_entries, write_front
from edgeslim.search._objective import is_dense
from edgeslim.search._progress import Progress
from edgeslim.search._study import spec_device, spec_objective
from edgeslim.search._workloads import load_workload
from edgeslim.spaces import Plan, SpecError

__all__ = ["RefineResult", "near_front", "refine_study"]

REFINE_FACTOR = 10  # default refine steps: this many times the search's fine-tune
KEPT = ("per_class_accuracy", "latency_p95_ms", "latency_method", "accuracy_method", "torch_accuracy",
        "latency_reference_ms", "latency_speedup_paired", "latency_speedup_spread", "runtime_bits",
        "runtime_kernels", "artifact_bytes", "energy_method", "finetune_loss")


@dataclasses.dataclass
class RefineResult:
    """What :func:`refine_study` did: settings, the trials it scored, the new front."""

    steps: int
    lr: float
    trials: list[int]
    front: list[dict[str, Any]]
    seconds: float
    out_dir: Path


def _dominates(a: Sequence[float], b: Sequence[float], signs: Sequence[float]) -> bool:
    better_or_equal = all(s * x >= s * y for x, y, s in zip(a, b, signs))
    return better_or_equal and any(s * x > s * y for x, y, s in zip(a, b, signs))


def near_front(study: optuna.Study, names: Sequence[str], margin_pp: float) -> list[FrozenTrial]:
    """The front's trials and every feasible completed trial that ``margin_pp`` more accuracy
    would put on it (a longer fine-tune may recover that much), in trial order.

    Example:
        >>> [t.number for t in near_front(study, ["accuracy", "latency_ms"], 0.5)]  # doctest: +SKIP
        [0, 3, 7, 12]
    """
    signs = [1.0 if d == optuna.study.StudyDirection.MAXIMIZE else -1.0 for d in study.directions]
    front = study.best_trials
    chosen = {t.number: t for t in front}
    if "accuracy" in names and margin_pp > 0:
        k = list(names).index("accuracy")
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number in chosen or any(v > 0 for v in t.user_attrs.get("constraints", {}).values()):
                continue
            lifted = list(t.values)
            lifted[k] += margin_pp / 100.0
            if not any(_dominates(f.values, lifted, signs) for f in front):
                chosen[t.number] = t
    return [chosen[n] for n in sorted(chosen)]


def _record(candidate: Any, names: Sequence[str], steps: int, lr: float) -> dict[str, Any]:
    rec = {n: candidate.metrics[n] for n in names}
    rec.update({k: candidate.metrics[k] for k in KEPT if k in candidate.metrics})
    rec["refine"] = {"steps": steps, "lr": lr}
    return rec


def refine_study(study_dir: Path, storage: str | None = None, steps: int | None = None, lr: float | None = None,
                 margin_pp: float | None = None, devices_dir: Path = DEVICES_DIR,
                 log: Callable[[str], None] | None = None) -> RefineResult:
    """Fine-tune the front (and the trials within ``margin_pp`` of it) ``steps`` steps and score
    each on its exported artifact through the search's own pipeline; store the figures on the
    study (user attribute ``refined``) and write pareto.json/csv and report.html again.

    The search's figures stay on the trials; the front, ``pick`` and the report use the
    refined ones where they exist and show the search's beside them. The dense baseline is
    scored again the same way with zero steps (it is never fine-tuned). Defaults come from
    the spec's ``[refine]``: steps 10x the search's, the search's learning rate, margin 0.5 pp.

    Example:
        >>> refine_study(Path("studies/digits-demo")).trials  # doctest: +SKIP
        [0, 2, 3, 12, 13, 14]
    """
    say = log or (lambda msg: print(msg, file=sys.stderr))
    study, spec = open_study_dir(study_dir, storage)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise SpecError(f"study {study.study_name!r} in {study_dir} has no completed trial to refine; "
                        "run `edgeslim search` on it first")
    names = list(study.metric_names or spec.objectives)
    if "accuracy" not in names:
        raise SpecError(f"study {study.study_name!r} has no accuracy objective ({names}); refining fine-tunes "
                        "for accuracy, so there is nothing to refine")
    cfg = spec.refine
    steps = steps if steps is not None else cfg.steps if cfg.steps is not None else REFINE_FACTOR * spec.finetune.steps
    lr = lr if lr is not None else cfg.lr if cfg.lr is not None else spec.finetune.lr
    margin = margin_pp if margin_pp is not None else cfg.margin_pp
    if steps < 1:
        raise SpecError(f"refine steps must be >= 1, got {steps}; the search fine-tuned {spec.finetune.steps} "
                        "steps, so give --steps or set [refine] steps")
    if lr <= 0 or margin < 0:
        raise SpecError(f"refine needs lr > 0 and margin >= 0; got lr {lr!r}, margin {margin!r} pp")
    workload = load_workload(spec, study_dir, say)
    if study.user_attrs.get("base_model_hash") not in (None, workload.model_hash):
        raise SpecError("the base model changed since the search; refining would not score the searched trials")
    objective = spec_objective(spec, workload, spec_device(spec, devices_dir), study)
    chosen = near_front(study, names, margin)
    say(f"refining {len(chosen)} trials of {study.study_name!r} ({len(study.best_trials)} on the front, "
        f"margin {margin} pp): {steps} fine-tune steps at lr {lr:g}, scored on the exported artifact")
    t0 = time.perf_counter()
    progress = Progress(len(chosen) + 1, "variants")
    out: dict[str, Any] = {"trials": {}}
    with objective:
        progress.update(0, "dense baseline")
        dense = objective.score(objective.space.dense_plan(), steps=steps, lr=lr, score_artifact=True)
        out["baseline"] = {**_record(dense, names, 0, lr), "trial": "dense (refine protocol)"}
        for i, trial in enumerate(chosen, 1):
            plan = Plan.from_dict(trial.user_attrs["plan"])
            # the dense trial is the baseline just scored: same plan, same protocol, zero steps
            candidate = dense if is_dense(plan) else objective.score(plan, steps=steps, lr=lr, score_artifact=True)
            out["trials"][str(trial.number)] = _record(candidate, names, 0 if is_dense(plan) else steps, lr)
            progress.update(i, f"trial {trial.number}: accuracy {candidate.metrics['accuracy']:.4f} "
                               f"(search {trial.values[names.index('accuracy')]:.4f})")
    out["settings"] = {"steps": steps, "lr": lr, "margin_pp": margin, "seconds": time.perf_counter() - t0}
    study.set_user_attr("refined", out)
    front = front_entries(study, names)
    write_front(front, study_dir)
    from edgeslim.search._report import build_report_data, render_report

    render_report(build_report_data(study, names, front, spec.budgets.active(),
                                   f"edgeslim study {study.study_name} (refined)"), study_dir / "report.html")
    return RefineResult(steps, lr, [t.number for t in chosen], front, time.perf_counter() - t0, study_dir)

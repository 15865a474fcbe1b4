"""The Optuna objective: one trial pipeline (realize → fine-tune → artifact → objectives) behind
``study.optimize``, the CLI search, the refine stage and export."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn
from torch.utils.data import Dataset

from edgeslim.objectives import (OBJECTIVES, Candidate, DataSplits, DeviceProfile, EvalContext, FinetuneConfig,
                                 Objective, evaluate_accuracy, export_onnx, is_label_free, load_device, logits_of,
                                 sample_inputs, teacher_labelled)
from edgeslim.search._budgets import constraint_values
from edgeslim.search._workloads import Workload, model_hash
from edgeslim.spaces import CompressionSpace, Plan, RuleSet, SpecError

__all__ = ["CompressionObjective", "DEFAULT_OBJECTIVES", "DENSE_POLICY", "PRESETS", "is_dense",
           "ordered_objectives", "score_plan"]

DEFAULT_OBJECTIVES = ("accuracy", "size_bytes", "latency_ms", "energy_mj")
PRUNING_SAMPLES = 64  # training inputs that rank channels for pruning (one forward pass per study)
PRUNING_CRITERIA = ("activation", "magnitude")

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

DENSE_POLICY = "the dense baseline is the user's model as given: zero fine-tune steps"


def ordered_objectives(names: Sequence[str]) -> list[Objective]:
    """Objectives in evaluation order: those that change the candidate (fine-tuning) first,
    then dependencies before their dependents, keeping the given order otherwise.

    Example:
        >>> [o.name for o in ordered_objectives(["energy_mj", "latency_ms", "accuracy"])]
        ['accuracy', 'latency_ms', 'energy_mj']
    """
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise SpecError(f"unknown objectives {unknown}; choose from {sorted(OBJECTIVES)}")
    objs = [OBJECTIVES[n]() for n in names]
    return sorted(objs, key=lambda o: (not o.mutates, len(o.requires)))


def is_dense(plan: Plan) -> bool:
    """Whether ``plan`` changes nothing: no pruning, full rank, 32-bit everywhere.

    Example:
        >>> is_dense(Plan())
        True
    """
    return all(s == 0 for _, s in plan.groups) and all(lp.rank == 1.0 and lp.bits == 32 for _, lp in plan.layers)


def score_plan(plan: Plan, space: CompressionSpace, model: nn.Module, objectives: Sequence[Objective],
               ctx: EvalContext) -> Candidate:
    """The one trial pipeline: realize ``plan`` on ``model``, then run ``objectives`` in the
    order given (see :func:`ordered_objectives`: accuracy fine-tunes the candidate first, so
    everything after scores the fine-tuned model and its artifact).

    The dense plan is the user's model itself and is never fine-tuned (``DENSE_POLICY``): a
    fine-tune of a converged model only drifts it, and every "drop vs dense" would be measured
    against that drifted figure.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> space = CompressionSpace.build(m, torch.zeros(1, 4))
        >>> c = score_plan(space.uniform_plan(bits=8), space, m, ordered_objectives(["size_bytes"]),
        ...                EvalContext(data=None, example_input=torch.zeros(1, 4)))
        >>> c.metrics["size_bytes"] < 4 * (4 * 8 + 8 + 8 * 2 + 2)
        True
    """
    space.check(plan)
    torch.manual_seed(ctx.seed)
    if is_dense(plan):
        ctx = dataclasses.replace(ctx, finetune=dataclasses.replace(ctx.finetune, steps=0))
    candidate = Candidate(plan, space.realize(model, plan, reduce_range=ctx.device.int8_reduce_range))
    for obj in objectives:
        value = obj.evaluate(candidate, ctx)
        if not math.isfinite(value):
            raise ValueError(f"objective {obj.name} returned {value!r}")
        candidate.metrics[obj.name] = value
    return candidate


def _suggest(trial: optuna.Trial, name: str, dist: optuna.distributions.BaseDistribution) -> Any:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, optuna.distributions.FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    raise TypeError(f"no suggest call for {type(dist).__name__} ({name})")


def _data_fingerprint(data: DataSplits) -> str:
    """Sizes and first samples of both splits: tells two datasets apart without reading them whole."""
    h = hashlib.sha256(json.dumps([len(data.train), len(data.val), data.num_classes]).encode())
    for split in (data.train, data.val):
        if len(split):
            x, y = split[0][0], split[0][1]
            h.update(torch.as_tensor(x).detach().cpu().contiguous().numpy().tobytes())
            h.update(str(int(y)).encode())
    return h.hexdigest()[:16]


def with_teacher_labels(data: DataSplits, model: nn.Module) -> DataSplits:
    """``data`` with the dense model's top-1 as the label of every split that has none (label-free
    data: a dataset of inputs only). A label-free held-out split makes "accuracy" the agreement
    with the dense model, and ``label_free`` says so to every output.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> d = with_teacher_labels(DataSplits(TensorDataset(torch.eye(2)), TensorDataset(torch.eye(2)), 2), nn.Identity())
        >>> d.label_free, [int(y) for _, y in d.val]
        (True, [0, 1])
    """
    if not (is_label_free(data.train) or is_label_free(data.val)):
        return data

    def teacher(x: torch.Tensor) -> torch.Tensor:
        return logits_of(model(x))

    model.eval()
    train = teacher_labelled(data.train, teacher) if is_label_free(data.train) else data.train
    val = teacher_labelled(data.val, teacher) if is_label_free(data.val) else data.val
    return dataclasses.replace(data, train=train, val=val, label_free=is_label_free(data.val),
                               class_names=data.class_names or tuple(str(i) for i in range(data.num_classes)))


class CompressionObjective:
    """An Optuna objective over a model's compression space: each call draws a plan (per-layer
    channel sparsity, rank and bits) from the trial, realizes it, fine-tunes it briefly and
    scores it on ``objectives``; it returns their values in that order.

    ``directions`` feeds ``optuna.create_study``; :meth:`enqueue_baselines` adds the dense model
    and uniform presets once, so every study holds its own baselines. A trial that raises
    records why in its ``fail_reason`` user attribute; pass ``catch=(Exception,)`` to
    ``study.optimize`` to let the study go on past it. The dense plan is never fine-tuned.

    ``device`` is ``"local"`` (latency measured here with ONNX Runtime, ``threads`` threads)
    or a calibrated profile's name or :class:`DeviceProfile` (latency predicted).
    ``channel_multiple`` rounds kept channel counts (0: the device's probed channel block).
    ``pruning`` chooses the channels a plan removes: ``"activation"`` ranks them by what their
    removal changes in the layers reading them, over ``PRUNING_SAMPLES`` training inputs, and
    keeps their mean in those layers' biases; ``"magnitude"`` removes the lowest L1 norms.

    Example:
        >>> import optuna
        >>> from edgeslim.search import DigitsCNN, digits_splits
        >>> data, _ = digits_splits(8, 0.3, seed=0)
        >>> objective = CompressionObjective(DigitsCNN(), torch.zeros(1, 1, 8, 8), data.train, data.val,
        ...                                  objectives=["accuracy", "size_bytes"],
        ...                                  finetune=FinetuneConfig(steps=2))
        >>> study = optuna.create_study(directions=objective.directions)
        >>> objective.enqueue_baselines(study)
        >>> study.optimize(objective, n_trials=2)
        >>> study.trials[0].user_attrs["preset"]
        'dense'
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, train_set: Dataset, val_set: Dataset, *,
                 device: str | DeviceProfile = "local", threads: int | None = None,
                 objectives: Sequence[str] = DEFAULT_OBJECTIVES, finetune: FinetuneConfig | None = None,
                 rules: RuleSet | None = None, budgets: Mapping[str, float] | None = None, seed: int = 0,
                 score_artifact: bool = False, channel_multiple: int = 1, num_classes: int | None = None,
                 class_names: Sequence[str] = (), description: str = "", pruning: str = "activation") -> None:
        model.eval()
        if num_classes is None:  # a classifier's logits tell its class count
            with torch.no_grad():
                num_classes = int(logits_of(model(example_input)).shape[-1])
        data = with_teacher_labels(DataSplits(train_set, val_set, num_classes, tuple(class_names)), model)
        workload = Workload(model, data, example_input, description or type(model).__name__,
                            evaluate_accuracy(model, data)[0], _data_fingerprint(data), model_hash(model))
        profile = device if isinstance(device, DeviceProfile) else load_device(device, threads)
        self._setup(workload, profile, objectives, finetune or FinetuneConfig(), rules, budgets or {}, seed,
                    score_artifact, channel_multiple, pruning)

    @classmethod
    def from_workload(cls, workload: Workload, device: DeviceProfile, *, objectives: Sequence[str],
                      finetune: FinetuneConfig, rules: RuleSet | None = None,
                      budgets: Mapping[str, float] | None = None, seed: int = 0, score_artifact: bool = False,
                      channel_multiple: int = 1, pruning: str = "activation") -> CompressionObjective:
        """The objective of a :class:`Workload` the CLI already built (base accuracy evaluated)."""
        self = cls.__new__(cls)
        self._setup(workload, device, objectives, finetune, rules, budgets or {}, seed, score_artifact,
                    channel_multiple, pruning)
        return self

    def _setup(self, workload: Workload, device: DeviceProfile, objectives: Sequence[str],
               finetune: FinetuneConfig, rules: RuleSet | None, budgets: Mapping[str, float], seed: int,
               score_artifact: bool, channel_multiple: int, pruning: str) -> None:
        from edgeslim.search._budgets import check_budgets

        self.workload = workload
        self.device = device
        self.metric_names = list(objectives)
        self.objectives = ordered_objectives(self.metric_names)
        self.directions = [OBJECTIVES[n].direction for n in self.metric_names]
        self.budgets = check_budgets(dict(budgets))
        self.seed = seed
        multiple = channel_multiple or device.channel_multiple
        if pruning not in PRUNING_CRITERIA:
            raise SpecError(f"pruning must be one of {list(PRUNING_CRITERIA)}, got {pruning!r}")
        self.pruning = pruning
        calibration = None
        if pruning == "activation" and len(workload.data.train):
            calibration = torch.cat(sample_inputs(workload.data.train, PRUNING_SAMPLES, seed))
        self.space = CompressionSpace.build(workload.model, workload.example_input, rules, int(multiple),
                                            calibration=calibration)
        self.distributions = self.space.distributions()
        self._tmp = tempfile.TemporaryDirectory(prefix="edgeslim-")
        self.context = EvalContext(data=workload.data, example_input=workload.example_input, finetune=finetune,
                                   device=device, seed=seed, score_artifact=score_artifact,
                                   workdir=Path(self._tmp.name),
                                   teacher=workload.model if finetune.distill > 0 else None)

    @property
    def model(self) -> nn.Module:
        """The base model (never changed: every plan is realized on a copy)."""
        return self.workload.model

    def reference_artifact(self, measured: bool | None = None) -> Path | None:
        """The dense model's ONNX file, exported once: measured latency times every candidate
        paired with it (see :func:`edgeslim.objectives.measure_latency`). None where latency is
        not measured (a calibrated profile predicts it), unless ``measured`` asks for it."""
        wanted = measured if measured is not None else ("latency_ms" in self.metric_names
                                                        and not self.device.predicts_latency)
        if wanted and self.context.reference_artifact is None:
            self.context.reference_artifact = export_onnx(self.workload.model, self.workload.example_input,
                                                          self.context.workdir / "dense-reference.onnx")
        return self.context.reference_artifact if wanted else None

    def describe(self) -> str:
        """One line: the model, its base accuracy and the space searched."""
        s = self.space
        return (f"{self.workload.description}, base accuracy {self.workload.base_accuracy:.4f}; "
                f"{len(self.distributions)} knobs over {len(s.layers)} layers / {len(s.groups)} pruning groups"
                + (f" (kept channels rounded to multiples of {s.channel_multiple})" if s.channel_multiple > 1 else ""))

    def enqueue_baselines(self, study: optuna.Study) -> None:
        """Prepare ``study`` for this objective, once: check its directions and base model, name
        its metrics, record the device and channel rounding, and enqueue the dense model and the
        uniform presets (``PRESETS``, duplicates dropped) as its first trials."""
        directions = [d.name.lower() for d in study.directions]
        if directions != self.directions:
            raise SpecError(f"study {study.study_name!r} has directions {directions}, the objective "
                            f"{self.directions} ({self.metric_names}); create it with objective.directions")
        attrs = study.user_attrs
        if attrs.get("base_model_hash") not in (None, self.workload.model_hash):
            raise SpecError(f"study {study.study_name!r} was searched on a different base model "
                            f"({attrs.get('base_model_hash')} != {self.workload.model_hash}); use a new study (a worker on "
                            "another machine: copy base_model.pt from the study folder into its --out)")
        if attrs.get("channel_multiple") not in (None, self.space.channel_multiple):
            raise SpecError(f"study {study.study_name!r} rounds kept channels to multiples of "
                            f"{attrs['channel_multiple']}, the objective to {self.space.channel_multiple}; "
                            f"pass channel_multiple={attrs['channel_multiple']}")
        if attrs.get("pruning") not in (None, self.pruning):
            raise SpecError(f"study {study.study_name!r} chose pruned channels by {attrs['pruning']!r}, the "
                            f"objective by {self.pruning!r}; pass pruning={attrs['pruning']!r}")
        if not study.metric_names:
            import warnings

            with warnings.catch_warnings():  # experimental in Optuna, stable enough for the dashboard
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(self.metric_names)
        for key, value in (("base_model_hash", self.workload.model_hash), ("split_hash", self.workload.split_hash),
                           ("workload", self.workload.description), ("channel_multiple", self.space.channel_multiple),
                           ("pruning", self.pruning),
                           ("dense_policy", DENSE_POLICY), ("device", self.device.describe()),
                           ("label_free", self.workload.data.label_free)):
            if attrs.get(key) != value:
                study.set_user_attr(key, value)
        if attrs.get("presets_enqueued"):
            return
        seen: set[str] = set()
        for name, (s, r, b) in PRESETS.items():
            params = self.space.params_of(self.space.uniform_plan(sparsity=s, rank=r, bits=b))
            key = json.dumps(params, sort_keys=True)
            if key not in seen:
                seen.add(key)
                study.enqueue_trial(params, user_attrs={"preset": name}, skip_if_exists=False)
        study.set_user_attr("presets_enqueued", True)

    def score(self, plan: Plan, *, steps: int | None = None, lr: float | None = None,
              score_artifact: bool | None = None, objectives: Sequence[str] | None = None) -> Candidate:
        """Score one plan through the trial pipeline, with the fine-tune length, learning rate,
        accuracy source or objectives changed if given (the refine stage and export do)."""
        ctx = self.context
        ft = dataclasses.replace(ctx.finetune, **{k: v for k, v in (("steps", steps), ("lr", lr)) if v is not None})
        ctx = dataclasses.replace(ctx, finetune=ft,
                                  score_artifact=ctx.score_artifact if score_artifact is None else score_artifact)
        objs = self.objectives if objectives is None else ordered_objectives(objectives)
        if any(o.name == "latency_ms" for o in objs):
            ctx.reference_artifact = self.reference_artifact()
        return score_plan(plan, self.space, self.workload.model, objs, ctx)

    def __call__(self, trial: optuna.Trial) -> list[float]:
        """Score the plan ``trial`` draws; store plan, side metrics and constraints on it."""
        t0 = time.perf_counter()
        try:
            params = {name: _suggest(trial, name, dist) for name, dist in self.distributions.items()}
            plan = self.space.plan_from_params(params)
            trial.set_user_attr("plan", plan.to_dict())
            trial.set_user_attr("plan_summary", plan.summary())
            candidate = self.score(plan)
        except Exception as e:  # kept on the trial: the study shows why
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}")
            trial.set_user_attr("seconds", time.perf_counter() - t0)
            raise
        for key, value in candidate.metrics.items():
            trial.set_user_attr(key, value)
        constraints = constraint_values(self.budgets, candidate.metrics)
        for budget, value in constraints.items():
            trial.set_constraint(budget, value)
        trial.set_user_attr("constraints", constraints)
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        return [candidate.metrics[n] for n in self.metric_names]

    def export(self, study: optuna.Study, trial: int, out: str | Path, *, steps: int | None = None,
               slo: Any = None) -> Any:
        """Realize trial ``trial`` of ``study`` again through the same pipeline, scored on its
        exported artifact, and write ``model.onnx``, ``card.json`` and ``MODEL_CARD.md`` to the
        empty folder ``out`` (see :func:`edgeslim.search.write_variant`)."""
        from edgeslim.search._export import write_variant

        return write_variant(self, study, trial, Path(out), steps=steps, slo=slo)

    def close(self) -> None:
        """Remove the scratch folder (artifacts of scored candidates)."""
        self._tmp.cleanup()

    def __enter__(self) -> CompressionObjective:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

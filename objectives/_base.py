"""The objective base class, the candidate it scores and the context it scores in."""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from edgeslim.objectives.devices._profile import DeviceProfile
from edgeslim.spaces import Plan

__all__ = ["Candidate", "DataSplits", "EvalContext", "FinetuneConfig", "Objective"]


@dataclasses.dataclass(frozen=True)
class DataSplits:
    """Training data (fine-tuning and calibration) and a held-out split fine-tuning never sees.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> d = TensorDataset(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
        >>> DataSplits(d, d, num_classes=2).num_classes
        2
    """

    train: Dataset
    val: Dataset
    num_classes: int
    class_names: tuple[str, ...] = ()
    # the held-out labels are the dense model's top-1 (label-free data): accuracy is agreement with it
    label_free: bool = False


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Short fine-tune after compression: AdamW with cosine decay, fixed seed.

    ``norm``: ``"train"`` re-estimates BatchNorm statistics from the fine-tune's batches (a
    network trained here, pruned hard, needs new ones); ``"frozen"`` keeps the statistics the
    model came with and trains only BatchNorm's scale and shift (a pretrained network, whose
    statistics came from far more data than a short fine-tune sees); ``"reestimate"`` first
    re-estimates them on ``REESTIMATE_SAMPLES`` training samples (after pruning), then keeps them
    frozen while fine-tuning. ``dropout``: with True, dropout, drop-connect and anything else that
    acts differently in training run as in the user's training; with False only BatchNorm (with
    ``norm = "train"``) leaves eval mode, so a candidate learns from the same function the teacher
    computes (a pretrained network distilled into its compressed self on a few hundred samples
    drifts under the noise alone). ``distill`` > 0 adds knowledge distillation from the dense
    model (the teacher): loss = (1 - distill) x cross-entropy + distill x T^2 x KL(teacher || student)
    on logits softened by ``temperature`` T. ``device``: where the steps run, ``"auto"`` (CUDA when
    torch sees a GPU), ``"cpu"`` or ``"cuda"``; export and latency stay on the CPU either way.

    Example:
        >>> FinetuneConfig(steps=50).lr, FinetuneConfig().norm
        (0.001, 'train')
    """

    steps: int = 150
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    norm: Literal["train", "frozen", "reestimate"] = "train"
    dropout: bool = True
    distill: float = 0.0
    temperature: float = 2.0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.norm not in ("train", "frozen", "reestimate"):
            raise ValueError(f"norm must be 'train', 'frozen' or 'reestimate', got {self.norm!r}")
        if not 0.0 <= self.distill <= 1.0 or self.temperature <= 0:
            raise ValueError(f"distill must be in [0, 1] and temperature > 0, got {self.distill!r}, "
                             f"{self.temperature!r}")


@dataclasses.dataclass
class EvalContext:
    """What every objective may use: data, fine-tune settings, device, scratch folder, seed.

    Example:
        >>> ctx = EvalContext(data=None, example_input=torch.zeros(1, 4))  # doctest: +SKIP
    """

    data: DataSplits
    example_input: torch.Tensor
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    device: DeviceProfile = dataclasses.field(default_factory=DeviceProfile.local)
    workdir: Path = Path(".")
    seed: int = 0
    score_artifact: bool = False  # accuracy of the exported ONNX artifact instead of the torch candidate
    # the dense baseline's artifact: measured latency times each candidate paired with it
    reference_artifact: Path | None = None
    # the dense model, the teacher when the fine-tune distills (FinetuneConfig.distill > 0)
    teacher: nn.Module | None = None


@dataclasses.dataclass
class Candidate:
    """A realized plan being scored. Objectives record side results in ``metrics``.

    ``model`` is the realized module (fake-quantized layers included); fine-tuning updates
    it in place, which is why accuracy runs first.

    Example:
        >>> c = Candidate(plan=Plan(), model=nn.Linear(2, 2))
        >>> c.metrics
        {}
    """

    plan: Plan
    model: nn.Module
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    artifact: Any = None  # (path, bits per layer, kernel per layer) once exported, shared by objectives


class Objective(abc.ABC):
    """One scored quantity. Subclasses set ``name``, ``direction`` and ``unit``.

    ``requires`` lists objectives whose results this one reads from ``candidate.metrics``;
    the study orders objectives so those run first. An objective that changes the candidate
    (``mutates``: accuracy fine-tunes it) runs before every other, whatever the spec's order,
    so that size, latency and energy score the fine-tuned model and its artifact.

    Example:
        >>> class ParamCount(Objective):
        ...     name, direction, unit = "params", "minimize", ""
        ...     def evaluate(self, candidate, ctx):
        ...         return float(sum(p.numel() for p in candidate.model.parameters()))
        >>> ParamCount().evaluate(Candidate(Plan(), nn.Linear(2, 2)), None)
        6.0
    """

    name: ClassVar[str]
    direction: ClassVar[Literal["minimize", "maximize"]]
    unit: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    estimated: ClassVar[bool] = False
    mutates: ClassVar[bool] = False

    @abc.abstractmethod
    def evaluate(self, candidate: Candidate, ctx: EvalContext) -> float:
        """Score ``candidate``; record extra results in ``candidate.metrics``."""

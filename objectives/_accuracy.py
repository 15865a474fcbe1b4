"""Accuracy: a short, seeded fine-tune of the candidate, then top-1 on the held-out split."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.objectives._base import Candidate, DataSplits, EvalContext, FinetuneConfig, Objective
from edgeslim.objectives._data import batches
from edgeslim.objectives._machine import compute_slot
from edgeslim.spaces import ObjectiveError

__all__ = ["AccuracyObjective", "evaluate_accuracy", "evaluate_onnx_accuracy", "finetune_", "finetune_device", "logits_of",
           "predictions"]


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself; the first element of a tuple or list;
    a dict's (or an output object's) ``logits``, else its first tensor value.

    Example:
        >>> t = torch.zeros(1, 3)
        >>> logits_of(t) is t, logits_of((t, 1)) is t, logits_of({"aux": 1, "logits": t}) is t
        (True, True, True)
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return logits_of(output[0])
    if isinstance(output, dict) or hasattr(output, "logits"):
        found = output.get("logits") if isinstance(output, dict) else output.logits
        if found is None and isinstance(output, dict):
            found = next((v for v in output.values() if isinstance(v, torch.Tensor)), None)
        if isinstance(found, torch.Tensor):
            return found
    raise ObjectiveError(f"cannot find logits in the model's output (a {type(output).__name__}); return a "
                         "tensor, a tuple whose first element is the logits, or a dict with 'logits'")


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


REESTIMATE_SAMPLES = 1024  # BatchNorm statistics re-estimated on this many training samples


@torch.no_grad()
def reestimate_norms_(model: nn.Module, data: DataSplits, batch_size: int = 64, seed: int = 0,
                      samples: int = REESTIMATE_SAMPLES) -> int:
    """Re-estimate every BatchNorm's running statistics of ``model`` on up to ``samples``
    training samples (a plain average over them, not a moving one), dropout off; returns how
    many samples were used. After pruning, the channels a BatchNorm sees are sums over fewer
    inputs, so the statistics the model came with no longer describe them.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> m = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        >>> d = TensorDataset(torch.randn(100, 2), torch.zeros(100, dtype=torch.long))
        >>> reestimate_norms_(m, DataSplits(d, d, 3), batch_size=32)
        100
    """
    norms = _norms(model)
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch seen
    # only the norms in training mode: dropout, drop-connect (a block's own `self.training` check)
    # and anything else that acts differently in training would skew the statistics inference sees
    model.eval()
    for m in norms:
        m.train()
    seen = 0
    gen = torch.Generator().manual_seed(seed)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for x, _ in batches(data.train, batch_size, shuffle=True, generator=gen):
        model(x.to(device))
        seen += len(x)
        if seen >= samples:
            break
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return seen


def finetune_(model: nn.Module, data: DataSplits, cfg: FinetuneConfig, seed: int,
              teacher: nn.Module | None = None) -> float:
    """Fine-tune ``model`` in place on ``data.train`` for ``cfg.steps`` steps; returns last loss.

    AdamW with cosine decay to zero; batch order and dropout depend only on ``seed``. With
    ``cfg.norm == "frozen"`` BatchNorm keeps its statistics; with ``cfg.dropout`` False dropout
    and drop-connect stay off; with ``cfg.distill`` > 0 and a
    ``teacher`` the loss mixes in distillation from the teacher's softened logits. With
    ``cfg.device`` ``"cuda"`` (or ``"auto"`` on a machine with CUDA) the steps run on the GPU and
    the model comes back to the CPU, where export and timing happen. Each step holds a
    :func:`compute_slot`, so a latency timing elsewhere on this machine runs alone.

    Example:
        >>> finetune_(model, data, FinetuneConfig(steps=10), seed=0)  # doctest: +SKIP
        0.42
    """
    if cfg.steps <= 0:
        return float("nan")
    device = finetune_device(cfg.device)
    if device.type == "cpu":
        return _finetune(model, data, cfg, seed, teacher, device)
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    try:
        return _finetune(model, data, cfg, seed, teacher, device)
    finally:
        model.to("cpu")
        if teacher is not None:
            teacher.to("cpu")


def finetune_device(name: str) -> torch.device:
    """The torch device a fine-tune runs on: ``"cpu"``, ``"cuda"`` (an error without one) or
    ``"auto"`` (CUDA when torch sees a GPU, else the CPU).

    Example:
        >>> finetune_device("cpu").type
        'cpu'
    """
    if name == "cpu":
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if name == "auto":
            return torch.device("cpu")
        raise ObjectiveError(f"fine-tune device 'cuda' asked for, but torch {torch.__version__} sees no CUDA device "
                             "on this machine; use device = \"auto\" or \"cpu\"")
    raise ObjectiveError(f"unknown fine-tune device {name!r}; choose 'auto', 'cpu' or 'cuda'")


def _finetune(model: nn.Module, data: DataSplits, cfg: FinetuneConfig, seed: int, teacher: nn.Module | None,
              device: torch.device) -> float:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.norm == "reestimate":
        reestimate_norms_(model, data, cfg.batch_size, seed)
    model.train(cfg.dropout)  # dropout and drop-connect as in the user's training, or off
    for m in _norms(model):
        m.train(cfg.norm == "train")  # frozen: statistics stay as they came; scale and shift still train
    distill = cfg.distill if teacher is not None else 0.0
    if teacher is not None:
        teacher.eval()
    t = cfg.temperature
    step, loss_value = 0, float("nan")
    while step < cfg.steps:
        for x, y in batches(data.train, cfg.batch_size, shuffle=True, generator=gen):
            with compute_slot():
                loss_value = _step(model, opt, x.to(device), y.to(device), teacher, distill, t,
                                   0.5 * cfg.lr * (1 + math.cos(math.pi * step / cfg.steps)))
            step += 1
            if step >= cfg.steps:
                break
    model.eval()
    return loss_value


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, teacher: nn.Module | None,
          distill: float, t: float, lr: float) -> float:
    for group in opt.param_groups:
        group["lr"] = lr
    logits = logits_of(model(x))
    loss = F.cross_entropy(logits, y) if distill < 1.0 else logits.new_zeros(())
    value = loss.detach()
    if distill > 0:
        assert teacher is not None
        with torch.no_grad():
            soft_t, soft_s = logits_of(teacher(x)) / t, logits.detach() / t
            p_t, p_s = F.softmax(soft_t, dim=-1), F.softmax(soft_s, dim=-1)
            kl = (p_t * (F.log_softmax(soft_t, dim=-1) - F.log_softmax(soft_s, dim=-1))).sum(-1).mean()
        # the gradient of T² x KL(teacher || student) in closed form, T (p_s - p_t) / batch,
        # from one softmax for both sides: exactly zero where the student still computes the
        # teacher's logits. Autograd through log_softmax leaves ~1e-8 of rounding there, and
        # Adam, scale-free, turns that noise into full-size steps (a dense network distilled
        # into itself lost 9 % agreement in 20 steps at lr 1e-4).
        surrogate = t * ((p_s - p_t) * logits).sum(-1).mean()
        loss = (1.0 - distill) * loss + distill * surrogate
        value = (1.0 - distill) * value + distill * t * t * kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(value)


@torch.no_grad()
def predictions(model: nn.Module, data: DataSplits, batch_size: int = 256) -> np.ndarray:
    """Top-1 predictions of ``model`` on ``data.val``, in order.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> d = TensorDataset(torch.eye(3), torch.tensor([0, 1, 2]))
        >>> predictions(nn.Identity(), DataSplits(d, d, 3)).tolist()
        [0, 1, 2]
    """
    model.eval()
    out = []
    for x, _ in batches(data.val, batch_size):
        with compute_slot():
            out.append(logits_of(model(x)).argmax(1).numpy())
    return np.concatenate(out)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, data: DataSplits, batch_size: int = 256) -> tuple[float, list[float]]:
    """Top-1 accuracy on ``data.val`` and the accuracy of each class (NaN for absent classes).

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> d = TensorDataset(torch.eye(3), torch.tensor([0, 1, 1]))
        >>> evaluate_accuracy(nn.Identity(), DataSplits(d, d, 3))
        (0.6666666865348816, [1.0, 0.5, nan])
    """
    model.eval()
    correct = torch.zeros(data.num_classes)
    total = torch.zeros(data.num_classes)
    for x, y in batches(data.val, batch_size):
        with compute_slot():
            pred = logits_of(model(x)).argmax(dim=1)
        total += torch.bincount(y, minlength=data.num_classes).float()
        correct += torch.bincount(y[pred == y], minlength=data.num_classes).float()
    per_class = [float(c / t) if t > 0 else float("nan") for c, t in zip(correct, total)]
    return float(correct.sum() / total.sum().clamp_min(1)), per_class


def evaluate_onnx_accuracy(path: Path, data: DataSplits) -> tuple[float, list[float], np.ndarray]:
    """Top-1 accuracy, per-class accuracy and predictions of an ONNX file on ``data.val``,
    run through ONNX Runtime one sample at a time (artifacts are exported for batch 1).

    Example:
        >>> acc, per_class, pred = evaluate_onnx_accuracy(Path("model.onnx"), data)  # doctest: +SKIP
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    preds, labels = [], []
    for x, y in batches(data.val, 256):
        for i in range(len(x)):
            xi = x[i:i + 1].numpy()
            preds.append(int(sess.run(None, {name: xi.astype(np.float32) if xi.dtype.kind == "f" else xi})[0].argmax()))
        labels.extend(y.tolist())
    p, lab = np.array(preds), np.array(labels)
    per = [float((p[lab == c] == c).mean()) if (lab == c).any() else float("nan") for c in range(data.num_classes)]
    return float((p == lab).mean()), per, p


class AccuracyObjective(Objective):
    """Top-1 accuracy (0..1) on the held-out split after a short fine-tune.

    Records ``per_class_accuracy``, ``finetune_loss`` and ``accuracy_method`` in
    ``candidate.metrics``. With ``ctx.score_artifact`` the score is that of the exported,
    quantized ONNX file run by ONNX Runtime (the torch figure is kept as ``torch_accuracy``,
    the top-1 agreement of the two as ``torch_onnx_agreement``).

    Example:
        >>> AccuracyObjective.direction
        'maximize'
    """

    name = "accuracy"
    direction = "maximize"
    unit = ""
    mutates = True  # fine-tunes the candidate in place: runs before the other objectives

    def evaluate(self, candidate: Candidate, ctx: EvalContext) -> float:
        loss = finetune_(candidate.model, ctx.data, ctx.finetune, ctx.seed, ctx.teacher)
        acc, per_class = evaluate_accuracy(candidate.model, ctx.data)
        candidate.metrics["finetune_loss"] = loss
        candidate.metrics["accuracy_method"] = "torch candidate (fake-quantized)"
        if ctx.data.label_free:
            candidate.metrics["accuracy_method"] += "; label-free: agreement with the dense model's top-1"
        if ctx.score_artifact:
            from edgeslim.objectives._export import candidate_artifact

            path, _, _ = candidate_artifact(candidate, ctx)
            candidate.metrics["torch_accuracy"] = acc
            acc, per_class, ort_pred = evaluate_onnx_accuracy(path, ctx.data)
            candidate.metrics["torch_onnx_agreement"] = float((predictions(candidate.model, ctx.data) == ort_pred).mean())
            candidate.metrics["accuracy_method"] = "exported ONNX artifact (onnxruntime)" + (
                "; label-free: agreement with the dense model's top-1" if ctx.data.label_free else "")
        candidate.metrics["per_class_accuracy"] = per_class
        return acc

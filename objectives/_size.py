"""Size: bytes of the realized model's tensors at their stored bit-widths."""

from __future__ import annotations

import math

from torch import nn

from edgeslim.objectives._base import Candidate, EvalContext, Objective
from edgeslim.spaces import NBITS_BLOCK, QuantizedLayer

__all__ = ["SizeObjective", "model_size_bytes"]

FLOAT_BYTES = 4
ACT_QPARAM_BYTES = 4 + 1  # one fp32 scale and one uint8 zero point per quantized activation


def model_size_bytes(model: nn.Module) -> int:
    """Exact storage of ``model``: every tensor at the width it would be stored with.

    - quantized weight: ``ceil(numel * bits / 8)`` plus, per output channel, one fp32 scale
      and one zero point at the weight's width (``ceil(out * bits / 8)``), as ONNX QDQ stores them;
    - 4-bit Linear (weight-only, ONNX Runtime MatMulNBits): the weight padded to whole blocks
      of ``NBITS_BLOCK`` input features, two 4-bit values per byte, plus one fp32 scale per
      block (symmetric: no zero points stored);
    - quantized input and output activations: one fp32 scale + one uint8 zero point each;
    - everything else (biases, unquantized weights, BatchNorm parameters and running
      statistics): at its own dtype size; a BatchNorm inside a quantized conv's wrapper is
      folded into that conv by export and counts as the conv's fp32 bias. Integer buffers (BatchNorm's step counter) and the
      observer state of quantized layers are bookkeeping, not weights, and are not counted.

    Example:
        >>> model_size_bytes(nn.Linear(4, 2))  # (8 + 2) * 4
        40
        >>> model_size_bytes(QuantizedLayer(nn.Linear(4, 2), 8))  # 8 + 2*4 + 2 + 2*5 + 2*4 (bias)
        36
        >>> model_size_bytes(QuantizedLayer(nn.Linear(40, 2), 4))  # 2 rows * 2 blocks * (16 + 4) + 2*4
        88
    """
    total = 0
    skip: set[int] = set()
    folded: set[int] = set()  # BatchNorms that export folds into their quantized conv
    for module in model.modules():
        if id(module) in folded:
            continue
        if isinstance(module, QuantizedLayer):
            w = module.layer.weight
            out = w.shape[0]
            skip.add(id(w))
            if module.norm is not None:
                folded.add(id(module.norm))
                skip.update(id(p) for p in module.norm.parameters())
                if module.layer.bias is None:  # folding gives the conv a bias
                    total += out * FLOAT_BYTES
            if module.weight_only:
                blocks = out * math.ceil(w.shape[1] / NBITS_BLOCK)
                total += blocks * (NBITS_BLOCK // 2 + FLOAT_BYTES)
                continue
            total += math.ceil(w.numel() * module.bits / 8) + out * FLOAT_BYTES
            total += math.ceil(out * module.bits / 8)
            if module.quantize_input:
                total += 2 * ACT_QPARAM_BYTES  # input and output activations
            continue
        for buf in module.buffers(recurse=False):
            if buf.is_floating_point():
                total += buf.numel() * buf.element_size()
    for p in model.parameters():
        if id(p) not in skip:
            total += p.numel() * p.element_size()
    return total


class SizeObjective(Objective):
    """Model size in bytes from the realized model (see :func:`model_size_bytes`).

    Example:
        >>> SizeObjective().evaluate(Candidate(Plan(), nn.Linear(4, 2)), None)  # doctest: +SKIP
        40.0
    """

    name = "size_bytes"
    direction = "minimize"
    unit = "B"

    def evaluate(self, candidate: Candidate, ctx: EvalContext) -> float:
        return float(model_size_bytes(candidate.model))

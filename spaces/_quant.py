"""Fake quantization with a straight-through estimator, and stripping it for export."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QuantizedLayer", "quantize_weight", "dequantized_copy", "layer_bits"]

ACT_QMIN, ACT_QMAX = 0, 255  # activations: per-tensor asymmetric uint8, ONNX Runtime's U8S8 path


def quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric fake quantization of ``weight`` to ``bits`` (STE gradient).

    Values land on the grid ``scale * k`` with ``k`` in ``[-(2**(bits-1)-1), 2**(bits-1)-1]`` and
    ``scale = max|w_c| / (2**(bits-1)-1)`` per output channel ``c``, so the error per element is
    at most ``scale / 2``.

    Example:
        >>> w = torch.tensor([[1.0, -0.5, 0.26]])
        >>> quantize_weight(w, 4).tolist()  # scale 1/7
        [[1.0, -0.5714285969734192, 0.2857142984867096]]
    """
    qmax = 2 ** (bits - 1) - 1
    amax = weight.detach().abs().amax(dim=tuple(range(1, weight.ndim))).clamp_min(1e-12)
    scale = (amax / qmax).float()
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -qmax, qmax)


class QuantizedLayer(nn.Module):
    """A Conv1d/Conv2d/Linear computing with fake-quantized weights (and int8 inputs).

    Weights: per-output-channel symmetric at ``bits``. Inputs (when ``bits <= 8``): per-tensor
    asymmetric uint8 whose range is tracked as a moving average of batch min/max while training
    and frozen in eval mode (PyTorch's MovingAverageMinMaxObserver behaviour).

    Example:
        >>> q = QuantizedLayer(nn.Linear(4, 2), bits=8)
        >>> q(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(self, layer: nn.Module, bits: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.layer = layer
        self.bits = bits
        self.momentum = momentum
        self.quantize_input = bits <= 8
        self.register_buffer("act_min", torch.tensor(0.0))
        self.register_buffer("act_max", torch.tensor(0.0))
        self.register_buffer("observed", torch.tensor(False))

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().clamp(max=0.0), x.detach().max().clamp(min=0.0)
        if not bool(self.observed):
            self.act_min.copy_(lo)
            self.act_max.copy_(hi)
            self.observed.fill_(True)
        else:
            self.act_min.lerp_(lo, self.momentum)
            self.act_max.lerp_(hi, self.momentum)

    def act_qparams(self) -> tuple[float, int]:
        """(scale, zero_point) of the input activation quantizer."""
        span = float(self.act_max - self.act_min)
        scale = max(span / (ACT_QMAX - ACT_QMIN), 1e-12)
        zero = int(min(max(round(-float(self.act_min) / scale), ACT_QMIN), ACT_QMAX))
        return scale, zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_input:
            if self.training or not bool(self.observed):
                self._observe(x)
            scale, zero = self.act_qparams()
            x = torch.fake_quantize_per_tensor_affine(x, scale, zero, ACT_QMIN, ACT_QMAX)
        w = quantize_weight(self.layer.weight, self.bits)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        return self.layer._conv_forward(x, w, self.layer.bias)


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A plain float copy of ``model`` whose quantized layers hold their grid-snapped weights.

    Export uses this: ONNX Runtime's per-channel symmetric quantizer recovers exactly the same
    grid from these weights, so the artifact computes what was fine-tuned.

    Example:
        >>> m = nn.Sequential(QuantizedLayer(nn.Linear(4, 2), 8))
        >>> type(dequantized_copy(m)[0]).__name__
        'Linear'
    """
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, QuantizedLayer):
            plain = module.layer
            with torch.no_grad():
                plain.weight.copy_(quantize_weight(plain.weight, module.bits))
            if not name:  # the model itself is one quantized layer
                return plain
            _set_submodule(out, name, plain)
    return out


def layer_bits(model: nn.Module) -> dict[str, int]:
    """Weight bits of every Conv/Linear in ``model`` by FQN (32 for unquantized layers).

    FQNs are those of the plain layers, i.e. without the ``.layer`` of the wrapper.

    Example:
        >>> layer_bits(nn.Sequential(QuantizedLayer(nn.Linear(2, 2), 4), nn.Linear(2, 2)))
        {'0': 4, '1': 32}
    """
    bits: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer):
            bits[name] = module.bits
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            parent = name.rsplit(".", 1)[0] if name.endswith(".layer") else None
            if parent is not None and parent in bits:
                continue
            bits[name] = 32
    return bits


def _set_submodule(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)

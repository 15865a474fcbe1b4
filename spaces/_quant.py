"""Fake quantization with a straight-through estimator, and stripping it for export."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QuantizedLayer", "quantize_weight", "quantize_weight_blockwise", "quantize_input_blockwise",
           "dequantized_copy", "layer_bits", "weight_qmax", "NBITS_BLOCK"]

ACT_QMIN, ACT_QMAX = 0, 255  # activations: per-tensor asymmetric uint8 (U8S8, the fast x86 path)
NBITS_BLOCK = 32  # 4-bit Linear weights: one scale per 32 input features (ONNX Runtime MatMulNBits)


_PLAIN_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
_PLAIN_FORWARDS = tuple(t.forward for t in _PLAIN_TYPES)


def custom_forward(layer: nn.Module) -> bool:
    """Whether ``layer`` is a Conv/Linear subclass whose ``forward`` does more than the plain
    operation (padding computed in forward, weight standardization, ...). Quantizing such a layer
    runs its own forward with the quantized weight; it is factorized only where
    :func:`forward_is_plain` shows its forward to be the plain op on the input it meets (two plain
    layers would drop anything more).

    Example:
        >>> class Padded(nn.Conv2d):
        ...     def forward(self, x):
        ...         return super().forward(F.pad(x, [1, 1, 1, 1]))
        >>> custom_forward(Padded(1, 1, 3)), custom_forward(nn.Conv2d(1, 1, 3))
        (True, False)
    """
    return type(layer).forward not in _PLAIN_FORWARDS


def forward_is_plain(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``layer``'s own forward gives what the plain convolution or matmul gives on ``x``
    (an input of the shape it meets in the model): a subclass whose extra step is a no-op there
    (TF-"same" padding of a 1×1 conv pads nothing) can be factorized like a plain layer.

    Example:
        >>> class Same(nn.Conv2d):
        ...     def forward(self, x):
        ...         pad = (self.kernel_size[0] - 1) // 2
        ...         return super().forward(F.pad(x, [pad] * 4))
        >>> forward_is_plain(Same(4, 4, 1), torch.randn(1, 4, 6, 6)), forward_is_plain(Same(4, 4, 3), torch.randn(1, 4, 6, 6))
        (True, False)
    """
    plain = next(t for t in _PLAIN_TYPES if isinstance(layer, t)).forward
    with torch.no_grad():
        try:
            own, ref = layer(x), plain(layer, x)
        except Exception:  # the plain op cannot even take the input: certainly not the same
            return False
    return own.shape == ref.shape and bool(torch.allclose(own, ref, rtol=1e-4, atol=1e-5))


def weight_qmax(bits: int, reduce_range: bool = False) -> int:
    """Largest integer level of a symmetric ``bits`` weight; 7-bit levels for reduced-range int8.

    Example:
        >>> weight_qmax(8), weight_qmax(8, reduce_range=True), weight_qmax(4)
        (127, 63, 7)
    """
    if bits == 8 and reduce_range:
        return 63
    return 2 ** (bits - 1) - 1


def runtime_format(is_linear: bool, bits: int) -> tuple[bool, int, int]:
    """The one rule for how a layer at ``bits`` runs in ONNX Runtime: (weight-only, bits of its
    multiply-accumulates, bytes per activation element it reads and writes). A 4-bit Linear runs
    as MatMulNBits: 4-bit weights, fp32 input and output, its input quantized to int8 on the fly.
    Any other layer at <= 8 bits runs on int8 activations (QLinearConv, QGemm, or int4 weights
    dequantized for a 4-bit conv); 32 bits is fp32. Fake quantization, size, energy and the
    latency model's kernels all read this.

    Works elementwise on numpy arrays too.

    Example:
        >>> runtime_format(True, 4), runtime_format(False, 4), runtime_format(True, 8), runtime_format(False, 32)
        ((True, 8, 4), (False, 4, 1), (False, 8, 1), (False, 32, 4))
    """
    # arithmetic rather than branches: the latency model applies the rule to numpy arrays of kernels
    weight_only = is_linear & (bits == 4)
    return weight_only, bits + (8 - bits) * weight_only, 4 - 3 * (bits <= 8) * (1 - weight_only)


def quantize_weight(weight: torch.Tensor, bits: int, reduce_range: bool = False) -> torch.Tensor:
    """Per-output-channel symmetric fake quantization of ``weight`` to ``bits`` (STE gradient).

    Values land on the grid ``scale * k`` with ``|k| <= qmax`` and ``scale = max|w_c| / qmax``
    per output channel ``c`` (``qmax = 2**(bits-1)-1``, or 63 for reduced-range int8), so the
    error per element is at most ``scale / 2``. Reduced range is what ONNX Runtime needs on x86
    CPUs without VNNI, whose int8 kernels otherwise saturate intermediate sums.

    Example:
        >>> w = torch.tensor([[1.0, -0.6, 0.26]])
        >>> quantize_weight(w, 4).tolist()  # scale 1/7
        [[1.0, -0.5714285969734192, 0.2857142984867096]]
    """
    qmax = weight_qmax(bits, reduce_range)
    amax = weight.detach().abs().amax(dim=tuple(range(1, weight.ndim))).clamp_min(1e-12)
    scale = (amax / qmax).float()
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -qmax, qmax)


def quantize_weight_blockwise(weight: torch.Tensor, block: int = NBITS_BLOCK) -> torch.Tensor:
    """Block-wise symmetric 4-bit fake quantization of a Linear weight ``[out, in]`` (STE gradient).

    Each run of ``block`` input features of one output row gets its own scale: the block's
    value of largest magnitude, sign kept, divided by -8, so that value lands on level -8 and
    the others on ``round(w / scale)`` clipped to [-8, 7]. This is the rule of ONNX Runtime's
    MatMulNBits quantizer (symmetric, zero point 8), so the exported 4-bit MatMul computes
    with exactly these weights.

    Example:
        >>> w = torch.tensor([[0.8, -0.3, 0.05]])
        >>> quantize_weight_blockwise(w).tolist()  # scale -0.1: levels -8, 3, 0 (-0.5 rounds to even)
        [[0.800000011920929, -0.30000001192092896, 0.0]]
    """
    out, k = weight.shape
    pad = (-k) % block
    w = F.pad(weight, (0, pad)).reshape(out, -1, block)
    wd = w.detach()
    idx = wd.abs().argmax(dim=2, keepdim=True)
    scale = torch.gather(wd, 2, idx) / -8.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(wd / scale), -8, 7) * scale
    snapped = q.reshape(out, -1)[:, :k]
    return weight + (snapped - weight).detach()


def quantize_input_blockwise(x: torch.Tensor, block: int = NBITS_BLOCK) -> torch.Tensor:
    """Dynamic symmetric int8 quantization of ``x`` in blocks of ``block`` along its last axis (STE).

    This is what ONNX Runtime's MatMulNBits does to its input at ``accuracy_level=4`` (int8
    compute, the fast path on x86 and ARM): each block of one row is scaled by its largest
    magnitude / 127 and rounded.

    Example:
        >>> quantize_input_blockwise(torch.tensor([[1.27, 0.004, -0.5]])).tolist()
        [[1.2699999809265137, 0.0, -0.5]]
    """
    k = x.shape[-1]
    pad = (-k) % block
    xb = F.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, block)
    xd = xb.detach()
    scale = xd.abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    snapped = (torch.clamp(torch.round(xd / scale), -127, 127) * scale).reshape(*x.shape[:-1], -1)[..., :k]
    return x + (snapped - x).detach()


class QuantizedLayer(nn.Module):
    """A Conv1d/Conv2d/Linear computing with fake-quantized weights (and int8 inputs/outputs).

    Weights: per-output-channel symmetric at ``bits``. Inputs and outputs (when ``bits <= 8``):
    per-tensor asymmetric uint8, as ONNX Runtime's QDQ graphs quantize both sides of a
    QLinearConv/QGemm. A 4-bit Linear follows ONNX Runtime's MatMulNBits instead
    (``weight_only``): block-wise 4-bit weights, no activation observers, and its input
    quantized on the fly to int8 per block of 32 (the kernel's int8-compute mode). Ranges are tracked as a moving average of batch min/max while training
    and frozen in eval mode (PyTorch's MovingAverageMinMaxObserver behaviour); export hands
    these very scales to ONNX Runtime so the artifact computes what was fine-tuned.

    ``norm`` is the BatchNorm that followed the conv in the model: it runs between the conv and
    the output quantizer, live while fine-tuning (batch statistics, running averages updated),
    and :func:`dequantized_copy` folds it into the conv for export. Per-channel symmetric weight
    quantization commutes with that per-channel scaling, so the folded weights sit on the grid
    ONNX Runtime re-derives from them.

    Example:
        >>> q = QuantizedLayer(nn.Linear(4, 2), bits=8)
        >>> q(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(self, layer: nn.Module, bits: int, momentum: float = 0.1, reduce_range: bool = False,
                 norm: nn.Module | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.norm = norm
        self.bits = bits
        self.reduce_range = reduce_range
        self.momentum = momentum
        self.weight_only = runtime_format(isinstance(layer, nn.Linear), bits)[0]
        self.quantize_input = bits <= 8 and not self.weight_only
        self.register_buffer("act_min", torch.tensor(0.0))
        self.register_buffer("act_max", torch.tensor(0.0))
        self.register_buffer("out_min", torch.tensor(0.0))
        self.register_buffer("out_max", torch.tensor(0.0))
        self.register_buffer("observed", torch.tensor(False))
        self.register_buffer("out_observed", torch.tensor(False))
        self.calibrating = False  # absolute min/max (ONNX Runtime's MinMax) instead of a moving average
        # set by realizing a plan (see link_quantizers_): the ReLU that follows runs before the
        # output quantizer, and an input that is another quantized layer's output keeps its grid
        self.relu_after = False
        self.relu_max = math.inf  # ReLU6 after the layer: 6.0
        self.source: QuantizedLayer | None = None

    def _observe(self, x: torch.Tensor, lo_buf: torch.Tensor, hi_buf: torch.Tensor, flag: torch.Tensor) -> None:
        lo, hi = x.detach().min().clamp(max=0.0), x.detach().max().clamp(min=0.0)
        if not bool(flag):
            lo_buf.copy_(lo)
            hi_buf.copy_(hi)
            flag.fill_(True)
        elif self.calibrating:
            lo_buf.copy_(torch.minimum(lo_buf, lo))
            hi_buf.copy_(torch.maximum(hi_buf, hi))
        else:
            lo_buf.lerp_(lo, self.momentum)
            hi_buf.lerp_(hi, self.momentum)

    @staticmethod
    def _qparams(lo: torch.Tensor, hi: torch.Tensor) -> tuple[float, int]:
        scale = max(float(hi - lo) / (ACT_QMAX - ACT_QMIN), 1e-12)
        zero = int(min(max(ACT_QMIN + round(-float(lo) / scale), ACT_QMIN), ACT_QMAX))
        return scale, zero

    def __setattr__(self, name: str, value: object) -> None:
        if name == "source":  # a reference, not a child: the producer is owned by its own parent
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _shares_input(self) -> bool:
        return self.source is not None and self.source.quantize_input

    def act_qparams(self) -> tuple[float, int]:
        """(scale, zero_point) of the input activation quantizer (the producer's output
        quantizer's when the input is another quantized layer's output: one tensor, one grid)."""
        if self._shares_input():
            return self.source.out_qparams()
        return self._qparams(self.act_min, self.act_max)

    def has_qparams(self) -> bool:
        """Whether both activation quantizers have seen data (export needs their scales)."""
        seen = bool(self.source.out_observed) if self._shares_input() else bool(self.observed)
        return seen and bool(self.out_observed)

    def out_qparams(self) -> tuple[float, int]:
        """(scale, zero_point) of the output activation quantizer."""
        return self._qparams(self.out_min, self.out_max)

    def fake_weight(self) -> torch.Tensor:
        """The weight as the runtime stores it (grid-snapped), with a straight-through gradient."""
        if self.weight_only:
            return quantize_weight_blockwise(self.layer.weight)
        return quantize_weight(self.layer.weight, self.bits, self.reduce_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_only:
            x = quantize_input_blockwise(x)
        if self.quantize_input:
            if not self._shares_input() and (self.training or self.calibrating or not bool(self.observed)):
                self._observe(x, self.act_min, self.act_max, self.observed)
            scale, zero = self.act_qparams()
            x = torch.fake_quantize_per_tensor_affine(x, scale, zero, ACT_QMIN, ACT_QMAX)
        w = self.fake_weight()
        if custom_forward(self.layer):  # the subclass's own forward, with the quantized weight
            y = torch.func.functional_call(self.layer, {"weight": w}, (x,), strict=False)
        elif isinstance(self.layer, nn.Linear):
            y = F.linear(x, w, self.layer.bias)
        else:
            y = self.layer._conv_forward(x, w, self.layer.bias)
        if self.norm is not None:
            y = self.norm(y)
        if self.quantize_input and self.relu_after:  # quantized where ONNX Runtime quantizes: after it
            y = F.relu(y) if math.isinf(self.relu_max) else y.clamp(0.0, self.relu_max)
        if self.quantize_input:
            if self.training or self.calibrating or not bool(self.out_observed):
                self._observe(y, self.out_min, self.out_max, self.out_observed)
            scale, zero = self.out_qparams()
            y = torch.fake_quantize_per_tensor_affine(y, scale, zero, ACT_QMIN, ACT_QMAX)
        return y


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
                plain.weight.copy_(module.fake_weight())
                if module.norm is not None:
                    _fold_norm_(plain, module.norm)
            if not name:  # the model itself is one quantized layer
                return plain
            _set_submodule(out, name, plain)
    return out


def _fold_norm_(conv: nn.Module, bn: nn.Module) -> None:
    """Fold BatchNorm ``bn`` (eval statistics) into the conv before it, in place."""
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    factor = gamma / std
    conv.weight.mul_(factor.reshape(-1, *([1] * (conv.weight.ndim - 1))))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
    conv.bias = nn.Parameter((bias - bn.running_mean) * factor + beta)


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

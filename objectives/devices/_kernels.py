"""The kernels a candidate runs in ONNX Runtime, read off the realized torch module.

A candidate's latency is predicted as the sum of its kernels' latencies after the runtime's
fusions, plus a per-inference overhead. The fusions modelled here are the ones ONNX Runtime's
CPU provider applies to our exported graphs: BatchNorm folds into the preceding Conv, a
ReLU/ReLU6/Clip following a Conv or Gemm fuses into it (FusedConv / Gemm+activation), and an
int8 layer runs as Quantize → QLinearConv/QGemm → Dequantize. Reshapes, flattens and dropout
cost nothing.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from edgeslim.objectives.devices._layout import Layout
from edgeslim.spaces import ObjectiveError, QuantizedLayer, macs, runtime_format

__all__ = ["Kernel", "KERNEL_FEATURES", "Edge", "boundary_class", "extract_graph", "extract_kernels", "io_bytes",
           "boundary_name", "kernel_domain", "kernel_matrix", "kernel_type"]


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One runtime kernel with the shape features the latency model reads.

    ``op`` is one of ``conv``, ``gemm``, ``add``, ``pool``, ``gpool``, ``act``; spatial sizes
    are those of the input (``h``, ``w``) and output (``ho``, ``wo``); ``bits`` is the weight
    bit-width the kernel runs at (32 for float, also for weightless ops).

    Example:
        >>> k = Kernel("conv", 32, cin=16, cout=32, k=3, stride=1, groups=1, h=8, w=8, ho=8, wo=8)
        >>> kernel_type(k), k.macs
        ('conv_kxk@32', 294912)
    """

    op: str
    bits: int = 32
    cin: int = 1
    cout: int = 1
    k: int = 1
    stride: int = 1
    groups: int = 1
    h: int = 1
    w: int = 1
    ho: int = 1
    wo: int = 1
    layer: str = ""

    def __hash__(self) -> int:
        # kernels key the latency model's cache on every prediction: hash the fields once
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.shape, self.layer))
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def shape(self) -> tuple[Any, ...]:
        """Everything but the layer name: kernels with equal shapes take equal time."""
        return (self.op, self.bits, self.cin, self.cout, self.k, self.stride, self.groups, self.h, self.w,
                self.ho, self.wo)

    @property
    def macs(self) -> int:
        """Multiply-accumulates (elementwise ops: output elements)."""
        if self.op == "conv":
            return macs(self.out_elems, self.cin, self.groups, self.k * self.k)
        if self.op == "gemm":
            return macs(self.out_elems, self.cin)
        return self.out_elems

    @property
    def in_elems(self) -> int:
        """Elements of the (first) input tensor."""
        return self.cin * self.h * self.w

    @property
    def out_elems(self) -> int:
        """Elements of the output tensor."""
        return self.cout * self.ho * self.wo

    @property
    def weight_elems(self) -> int:
        """Weight elements (0 for weightless ops)."""
        if self.op == "conv":
            return self.cout * (self.cin // self.groups) * self.k * self.k
        if self.op == "gemm":
            return self.cin * self.cout
        return 0

    @property
    def weight_only(self) -> bool:
        """A 4-bit Linear: ONNX Runtime's MatMulNBits, 4-bit weights, float input and output."""
        return runtime_format(self.op == "gemm", self.bits)[0]

    @property
    def act_bytes(self) -> int:
        """Bytes per activation element the kernel reads and writes (1 in int8 kernels)."""
        return runtime_format(self.op == "gemm", self.bits)[2]

    @property
    def compute_bits(self) -> int:
        """Width of the multiply-accumulates (MatMulNBits quantizes its input to int8 and computes in int8)."""
        return runtime_format(self.op == "gemm", self.bits)[1]


_OPS = {"conv": 0, "gemm": 1}


def kernel_matrix(kernels: Sequence[Kernel]) -> tuple[np.ndarray, np.ndarray]:
    """Features (``KERNEL_FEATURES``) and work terms (1, MACs, bytes in, out, of weights) of many
    kernels at once: one vectorized pass, so scoring a 60-kernel candidate costs microseconds.

    Example:
        >>> f, t = kernel_matrix([Kernel("gemm", 32, cin=4, cout=2)])
        >>> t.tolist()
        [[1.0, 8.0, 16.0, 8.0, 32.0]]
    """
    raw = np.array([(_OPS.get(k.op, 2), k.bits, k.cin, k.cout, k.k, k.stride, k.groups, k.h, k.w, k.ho, k.wo)
                    for k in kernels], dtype=np.float64).reshape(-1, 11)
    op, bits, cin, cout, ksz, stride, groups, h, w, ho, wo = raw.T
    conv, gemm = op == 0, op == 1
    per_group = np.floor_divide(cin, np.maximum(groups, 1))
    out = cout * ho * wo
    work = np.where(conv, macs(out, cin, np.maximum(groups, 1), ksz * ksz), np.where(gemm, macs(out, cin), out))
    weights = np.where(conv, cout * per_group * ksz * ksz, np.where(gemm, cin * cout, 0.0))
    act = runtime_format(gemm, bits)[2]
    in_b, out_b, w_b = cin * h * w * act, cout * ho * wo * act, weights * bits / 8
    features = np.stack([np.log2(work + 1), np.log2(in_b + 1), np.log2(out_b + 1), np.log2(w_b + 1),
                         np.log2(cin), np.log2(cout), np.log2(ho * wo), ksz, stride,
                         (cin % 8 == 0).astype(float), (cout % 8 == 0).astype(float)], axis=1)
    terms = np.stack([np.ones_like(work), work, in_b, out_b, w_b], axis=1)
    return features, terms


KERNEL_FEATURES = ("log2_macs", "log2_in_bytes", "log2_out_bytes", "log2_weight_bytes", "log2_cin",
                   "log2_cout", "log2_out_hw", "kernel", "stride", "cin_mult8", "cout_mult8")


def kernel_type(k: Kernel) -> str:
    """The regressor a kernel belongs to: op variant and bits, e.g. ``conv_dw@8``.

    Example:
        >>> kernel_type(Kernel("conv", 8, cin=8, cout=8, groups=8, k=3))
        'conv_dw@8'
    """
    if k.op == "conv":
        if k.groups > 1:
            variant = "conv_dw" if k.groups == k.cin == k.cout else "conv_group"
        else:
            variant = "conv_pw" if k.k == 1 else "conv_kxk"
        return f"{variant}@{k.bits}"
    if k.op == "gemm":
        return f"gemm@{k.bits}"
    return f"{k.op}@32"


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantizedLayer) or super().is_leaf_module(m, qualname)


_ACTS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_FUSED_FUNCS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.clamp}
_FREE_FUNCS = {torch.flatten, torch.reshape, operator.getitem, getattr, torch.nn.functional.dropout}
_FREE_METHODS = {"view", "reshape", "flatten", "size", "contiguous", "squeeze", "unsqueeze", "permute",
                 "transpose", "dim"}
_FREE_MODULES = (nn.Flatten, nn.Dropout, nn.Identity, nn.BatchNorm1d, nn.BatchNorm2d)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.MaxPool1d, nn.AvgPool1d)
_GPOOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool2d)
_ELEMENTWISE_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Hardswish, nn.SiLU, nn.GELU, nn.Tanh, nn.LeakyReLU)
_ELEMENTWISE_FUNCS = {torch.sigmoid, torch.nn.functional.hardswish, torch.nn.functional.hardsigmoid,
                      torch.nn.functional.silu, torch.nn.functional.gelu, torch.tanh, operator.mul, torch.mul}


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()


def _chw(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) == 4:
        return shape[1], shape[2], shape[3]
    if len(shape) == 3:
        return shape[1], 1, shape[2]
    if len(shape) == 2:
        return shape[1], 1, 1
    return (int(math.prod(shape[1:])) if len(shape) > 1 else 1), 1, 1


def extract_kernels(model: nn.Module, example_input: torch.Tensor) -> list[Kernel]:
    """Trace ``model`` with torch.fx, propagate shapes, and list the kernels after fusion.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        >>> [kernel_type(k) for k in extract_kernels(m, torch.zeros(1, 1, 8, 8))]
        ['conv_kxk@32']
    """
    return extract_graph(model, example_input)[0]


Edge = tuple[int, int, bool]  # producer kernel index, consumer kernel index, activation between them


def boundary_class(producer: Kernel, consumer: Kernel, act: bool, layout: Layout | int) -> str:
    """How two connected kernels meet, which decides what the runtime does between them.

    ``q`` is an int8/int4-QDQ Conv/Gemm (quantized tensors in and out), ``c`` a float conv,
    depthwise conv or max pool that ONNX Runtime runs in its blocked NCHWc layout on the device
    (``layout``'s rules, probed there), so a chain of them skips the layout reorders a lone
    kernel pays, ``f`` any other kernel, ``a`` a residual Add (+ReLU; ONNX Runtime folds it into
    a preceding float conv). The producer stands on its output side, the consumer on its input side.
    ``+act`` marks a q>q boundary with an activation in between (dequantize, ReLU,
    quantize) rather than a direct int8 hand-over (the halves of a low-rank pair).

    Example:
        >>> a = Kernel("conv", 8, cin=16, cout=16, k=3)
        >>> boundary_class(a, a, True, 8), boundary_class(a, Kernel("gemm", 32, cin=16, cout=4), False, 8)
        ('q>q+act', 'q>f')
    """
    return boundary_name(kernel_domain(producer, layout), kernel_domain(consumer, layout, "in"), act)


def boundary_name(a: str, b: str, act: bool) -> str:
    """The class of a boundary from its two domains (see :func:`kernel_domain`).

    Example:
        >>> boundary_name("q", "q", True), boundary_name("c", "c", True)
        ('q>q+act', 'c>c')
    """
    return f"{a}>{b}" + ("+act" if act and a == b == "q" else "")


def kernel_domain(k: Kernel, layout: Layout | int, side: str = "out") -> str:
    """The side of a boundary a kernel stands on: ``q``, ``c``, ``a`` or ``f`` (see :func:`boundary_class`).

    ``layout`` holds the device's blocked-layout rules, probed there (:func:`probe_layout`; an
    int is a channel block with ONNX Runtime 1.32's x86 rules assumed); ``side`` is the kernel's
    ``"out"`` (what it hands on) or ``"in"`` (what it reads): a float conv with fewer input
    channels than the block runs blocked but reads the plain layout, like a network's first layer.
    Where ONNX Runtime does not block (block 1), no kernel stands in the ``c`` domain.

    Example:
        >>> kernel_domain(Kernel("conv", 32, cin=16, cout=32, k=3), 8)
        'c'
        >>> kernel_domain(Kernel("pool", 32, cin=24, cout=24, k=2), 8), kernel_domain(Kernel("pool", 32, cin=24, cout=24, k=2), 16)
        ('c', 'f')
        >>> low_rank_half = Kernel("conv", 32, cin=4, cout=64, k=1)
        >>> kernel_domain(low_rank_half, 16, "in"), kernel_domain(low_rank_half, 16, "out")
        ('f', 'c')
    """
    if k.op == "add":
        return "a"
    if k.op in ("conv", "gemm") and k.bits <= 8 and not k.weight_only:
        return "q"
    lay = layout if isinstance(layout, Layout) else _assumed(layout)
    if lay.block <= 1:
        return "f"
    if k.op == "pool":
        return "c" if lay.pool_blocked(k.cin) else "f"
    if k.op == "conv" and k.bits == 32:
        if k.groups == 1:
            blocked = lay.conv_reads_blocked(k.cin) if side == "in" else lay.conv_blocked(k.cin)
            return "c" if blocked else "f"
        if k.groups == k.cin == k.cout and lay.dw_blocked(k.cin):
            return "c"
    return "f"


_ASSUMED: dict[int, Layout] = {}


def _assumed(block: int) -> Layout:
    lay = _ASSUMED.get(block)
    if lay is None:
        lay = _ASSUMED[block] = Layout.assumed(block) if block > 1 else Layout(1)
    return lay


def extract_graph(model: nn.Module, example_input: torch.Tensor) -> tuple[list[Kernel], list[Edge]]:
    """Kernels after fusion (as :func:`extract_kernels`) and the edges between them.

    Raises :class:`ObjectiveError` naming the layer when an op has no kernel model here.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        >>> extract_graph(m, torch.zeros(1, 1, 8, 8))[1]
        [(0, 1, True)]
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as e:
        raise ObjectiveError(f"cannot trace {type(model).__name__} with torch.fx to list its kernels "
                             f"({e}); measure latency on the device with --device local") from e
    gm = torch.fx.GraphModule(model, graph)
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    modules = dict(gm.named_modules())
    kernels: list[Kernel] = []
    edges: list[Edge] = []
    producer_fuses: set[str] = set()  # nodes whose following activation is fused into them
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        src = args[0] if args else None
        in_shape = _shape(src) if src is not None else ()
        out_shape = _shape(node)
        if node.op == "call_module":
            mod = modules[node.target]
            bits = 32
            if isinstance(mod, QuantizedLayer):
                bits, mod = mod.bits, mod.layer
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
                cin, h, w = _chw(in_shape)
                cout, ho, wo = _chw(out_shape)
                kernels.append(Kernel("conv", bits, cin, cout, int(mod.kernel_size[-1]), int(mod.stride[-1]),
                                      mod.groups, h, w, ho, wo, node.target))
                producer_fuses.add(node.name)
            elif isinstance(mod, nn.Linear):
                rows = int(math.prod(out_shape[:-1])) if len(out_shape) > 1 else 1
                kernels.append(Kernel("gemm", bits, mod.in_features, mod.out_features, ho=rows, layer=node.target))
                producer_fuses.add(node.name)
            elif isinstance(mod, _FREE_MODULES):
                if src is not None and src.name in producer_fuses:
                    producer_fuses.add(node.name)  # BatchNorm folds; the activation after it still fuses
            elif isinstance(mod, _ACTS):
                if not (src is not None and src.name in producer_fuses):
                    c, h, w = _chw(out_shape)
                    kernels.append(Kernel("act", 32, c, c, h=h, w=w, ho=h, wo=w, layer=node.target))
            elif isinstance(mod, _POOLS):
                cin, h, w = _chw(in_shape)
                cout, ho, wo = _chw(out_shape)
                k = mod.kernel_size if isinstance(mod.kernel_size, int) else mod.kernel_size[-1]
                s = mod.stride if isinstance(mod.stride, int) else mod.stride[-1]
                kernels.append(Kernel("pool", 32, cin, cout, int(k), int(s), 1, h, w, ho, wo, node.target))
            elif isinstance(mod, _GPOOLS):
                cin, h, w = _chw(in_shape)
                kernels.append(Kernel("gpool", 32, cin, cin, h=h, w=w, layer=node.target))
            elif isinstance(mod, _ELEMENTWISE_MODULES):
                c, h, w = _chw(out_shape)
                kernels.append(Kernel("act", 32, c, c, h=h, w=w, ho=h, wo=w, layer=node.target))
            else:
                raise ObjectiveError(f"no latency kernel for layer {node.target!r} ({type(mod).__name__})")
        elif node.op == "call_function" or node.op == "call_method":
            fn = node.target
            if node.op == "call_method" and fn in _FREE_METHODS or fn in _FREE_FUNCS:
                continue
            if getattr(fn, "__name__", "") in ("stochastic_depth", "dropout"):  # identity at inference
                continue
            if node.op == "call_method" and fn in ("relu", "relu_", "clamp"):
                fn = torch.relu
            if node.op == "call_method" and fn == "mean":
                cin, h, w = _chw(in_shape)
                kernels.append(Kernel("gpool", 32, cin, cin, h=h, w=w, layer=node.name))
                continue
            if fn in _FUSED_FUNCS:
                if src is not None and src.name in producer_fuses:
                    continue
                c, h, w = _chw(out_shape)
                kernels.append(Kernel("act", 32, c, c, h=h, w=w, ho=h, wo=w, layer=node.name))
            elif fn in (operator.add, torch.add, operator.iadd) and len(args) == 2:
                c, h, w = _chw(out_shape)
                kernels.append(Kernel("add", 32, c, c, h=h, w=w, ho=h, wo=w, layer=node.name))
                producer_fuses.add(node.name)  # Add + ReLU is one kernel in the calibration too
            elif fn in _ELEMENTWISE_FUNCS:
                c, h, w = _chw(out_shape)
                kernels.append(Kernel("act", 32, c, c, h=h, w=w, ho=h, wo=w, layer=node.name))
            elif fn in (torch.nn.functional.adaptive_avg_pool2d, torch.mean):
                cin, h, w = _chw(in_shape)
                kernels.append(Kernel("gpool", 32, cin, cin, h=h, w=w, layer=node.name))
            elif fn in (torch.cat, torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d):
                raise ObjectiveError(f"no latency kernel for {node.name!r} ({getattr(fn, '__name__', fn)})")
            elif node.op == "call_function" and fn in (torch.nn.functional.linear, torch.conv2d):
                raise ObjectiveError(f"no latency kernel for functional {node.name!r}; use nn.Conv2d/nn.Linear")
            else:
                raise ObjectiveError(f"no latency kernel for {node.name!r} ({getattr(fn, '__name__', fn)})")
    # second pass: which kernel produced each value, and whether an activation sits in between
    by_layer = {k.layer: i for i, k in enumerate(kernels)}
    made_by: dict[str, tuple[int, bool]] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        idx = by_layer.get(node.target if node.op == "call_module" else node.name)
        if idx is not None:
            edges += [(made_by[a.name][0], idx, made_by[a.name][1]) for a in args if a.name in made_by]
            made_by[node.name] = (idx, False)
        elif args and args[0].name in made_by:
            is_act = (node.op == "call_module" and isinstance(modules[node.target], _ACTS)) or \
                node.target in _FUSED_FUNCS or (node.op == "call_method" and node.target in ("relu", "relu_", "clamp"))
            prod, act = made_by[args[0].name]
            made_by[node.name] = (prod, act or is_act)
    return kernels, edges


def io_bytes(kernels: Sequence[Kernel], example_input: torch.Tensor) -> int:
    """Bytes of the model's input and (last kernel's) output, which every inference binds.

    Example:
        >>> io_bytes([Kernel("gemm", 32, cin=4, cout=10)], torch.zeros(1, 4))
        56
    """
    out = kernels[-1].out_elems if kernels else 0
    return int(example_input.numel() * 4 + out * 4)

"""Calibration: single-kernel ONNX micro-models (built with ``onnx``, no torch), measured on the
device, sampled adaptively where the fitted latency model errs most (the nn-Meter approach)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeslim.objectives import _runner
from edgeslim.objectives._graph_fixes import keep_pools_float
from edgeslim.objectives._kernels import Kernel
from edgeslim.objectives._latency_model import LatencyModel
from edgeslim.spaces import NBITS_BLOCK

__all__ = ["CalibrationResult", "CHAINS", "MODES", "KERNEL_TYPES", "calibrate", "chain_model", "fit_measurements",
           "micro_model", "random_chain", "refit", "write_kit", "design"]

OPSET = 21  # int4 DequantizeLinear is standard from opset 21
IR_VERSION = 10

# (initial points per type, adaptive rounds, validation points per round, neighbours per round)
MODES: dict[str, tuple[int, int, int, int]] = {"quick": (30, 2, 10, 10), "full": (80, 4, 25, 25)}
CHAINS = {"quick": 80, "full": 300}  # connected-kernel models that fit the boundary terms
IO_SIZES = (1, 64, 1024, 8192, 32768, 131072, 524288, 1048576)  # Identity models for the overhead fit
MAX_MACS = 250_000_000

KERNEL_TYPES: tuple[str, ...] = tuple(
    [f"{v}@{b}" for v in ("conv_kxk", "conv_pw", "conv_dw", "conv_group", "gemm") for b in (32, 8, 4)]
    + ["add@32", "pool@32", "gpool@32", "act@32"])

_CHANNELS = (8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)
_SPATIAL = (4, 7, 8, 8, 14, 16, 16, 28, 32, 32, 56, 112)


def _tensor(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(arr, name)


def _int_tensor(name: str, dtype: int, dims: Sequence[int], values: np.ndarray) -> onnx.TensorProto:
    return helper.make_tensor(name, dtype, list(dims), values.astype(np.int64).ravel().tolist())


def micro_model(k: Kernel, seed: int = 0) -> onnx.ModelProto:
    """One kernel as an ONNX model, shaped the way our exported candidates run it.

    Conv and Gemm carry their fused ReLU; int8/int4 variants are QDQ graphs (Quantize →
    Dequantize → op with dequantized int weights and int32 bias → Quantize → Dequantize), which
    ONNX Runtime fuses into QLinearConv / QGemm for int8; a 4-bit Gemm is MatMulNBits + bias Add
    + ReLU, as export writes a 4-bit Linear; ``add`` is Add + ReLU.

    Example:
        >>> m = micro_model(Kernel("conv", 8, cin=8, cout=16, k=3, h=8, w=8, ho=8, wo=8))
        >>> sorted({n.op_type for n in m.graph.node})
        ['Conv', 'DequantizeLinear', 'QuantizeLinear', 'Relu']
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    f32 = TensorProto.FLOAT
    if k.weight_only:  # what export makes of a 4-bit Linear: MatMulNBits, then the bias Add
        rows, blocks = k.ho * k.wo, -(-k.cin // NBITS_BLOCK)
        packed = rng.integers(0, 256, (k.cout, blocks, NBITS_BLOCK // 2)).astype(np.uint8)
        inits += [_tensor("wq", packed), _tensor("ws", (rng.random((k.cout, blocks)) * 0.02 + 0.001).astype(np.float32)),
                  _tensor("b", (rng.standard_normal(k.cout) * 0.1).astype(np.float32))]
        nodes += [helper.make_node("MatMulNBits", ["x", "wq", "ws"], ["y"], domain="com.microsoft",
                                   K=k.cin, N=k.cout, bits=4, block_size=NBITS_BLOCK, accuracy_level=4),
                  helper.make_node("Add", ["y", "b"], ["y2"]), helper.make_node("Relu", ["y2"], ["out"])]
        inputs = [helper.make_tensor_value_info("x", f32, [rows, k.cin])]
        y_shape = [rows, k.cout]
    elif k.op in ("conv", "gemm"):
        x_shape = [1, k.cin, k.h, k.w] if k.op == "conv" else [k.ho * k.wo, k.cin]
        y_shape = [1, k.cout, k.ho, k.wo] if k.op == "conv" else [k.ho * k.wo, k.cout]
        w_shape = [k.cout, k.cin // k.groups, k.k, k.k] if k.op == "conv" else [k.cout, k.cin]
        w = rng.standard_normal(w_shape).astype(np.float32) * 0.1
        b = rng.standard_normal(k.cout).astype(np.float32) * 0.1
        x_in, w_in, b_in = "x", "w", "b"
        if k.bits <= 8:
            qmax = 2 ** (k.bits - 1) - 1
            wdt = TensorProto.INT8 if k.bits == 8 else TensorProto.INT4
            ws = (np.abs(w).reshape(k.cout, -1).max(axis=1) / qmax).astype(np.float32)
            wq = np.clip(np.round(w / ws.reshape(-1, *([1] * (w.ndim - 1)))), -qmax, qmax)
            xs = np.float32(8.0 / 255)
            inits += [_int_tensor("wq", wdt, w_shape, wq), _tensor("ws", ws),
                      _int_tensor("wz", wdt, [k.cout], np.zeros(k.cout)),
                      _int_tensor("bq", TensorProto.INT32, [k.cout], np.round(b / (xs * ws))),
                      _tensor("bs", (xs * ws).astype(np.float32)),
                      _int_tensor("bz", TensorProto.INT32, [k.cout], np.zeros(k.cout)),
                      _tensor("xs", np.array(xs, np.float32)), _tensor("xz", np.array(128, np.uint8)),
                      _tensor("ys", np.array(16.0 / 255, np.float32)), _tensor("yz", np.array(128, np.uint8))]
            nodes += [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                      helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                      helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
                      helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bd"], axis=0)]
            x_in, w_in, b_in = "xd", "wd", "bd"
        else:
            inits += [_tensor("w", w), _tensor("b", b)]
        if k.op == "conv":
            pad = k.k // 2
            nodes.append(helper.make_node("Conv", [x_in, w_in, b_in], ["y"], kernel_shape=[k.k, k.k],
                                          strides=[k.stride, k.stride], pads=[pad] * 4, group=k.groups))
        else:
            nodes.append(helper.make_node("Gemm", [x_in, w_in, b_in], ["y"], transB=1))
        if k.bits <= 8:
            nodes += [helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
                      helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y2"]),
                      helper.make_node("Relu", ["y2"], ["out"])]
        else:
            nodes.append(helper.make_node("Relu", ["y"], ["out"]))
        inputs = [helper.make_tensor_value_info("x", f32, x_shape)]
    elif k.op == "add":
        shape = [1, k.cin, k.h, k.w]
        inputs = [helper.make_tensor_value_info(n, f32, shape) for n in ("x", "x2")]
        nodes += [helper.make_node("Add", ["x", "x2"], ["y"]), helper.make_node("Relu", ["y"], ["out"])]
        y_shape = shape
    elif k.op == "pool":
        inputs = [helper.make_tensor_value_info("x", f32, [1, k.cin, k.h, k.w])]
        pad = (k.ho - 1) * k.stride + k.k - k.h  # total padding that gives the kernel's output size
        nodes.append(helper.make_node("MaxPool", ["x"], ["out"], kernel_shape=[k.k, k.k],
                                      strides=[k.stride, k.stride],
                                      pads=[max(pad, 0) // 2, max(pad, 0) // 2, -(-max(pad, 0) // 2), -(-max(pad, 0) // 2)]))
        y_shape = [1, k.cout, k.ho, k.wo]
    elif k.op == "gpool":
        # what torch exports for a classifier's global pool and flatten: ReduceMean then Reshape
        # (ONNX Runtime's GlobalAveragePool is up to 2x slower at 1280x7x7, so it is not a stand-in)
        inputs = [helper.make_tensor_value_info("x", f32, [1, k.cin, k.h, k.w])]
        inits += [_tensor("axes", np.array([2, 3], np.int64)), _tensor("flat", np.array([1, k.cin], np.int64))]
        nodes += [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=1),
                  helper.make_node("Reshape", ["m", "flat"], ["out"])]
        y_shape = [1, k.cin]
    elif k.op == "act":
        shape = [1, k.cin, k.h, k.w]
        inputs = [helper.make_tensor_value_info("x", f32, shape)]
        nodes.append(helper.make_node("Sigmoid", ["x"], ["out"]))
        y_shape = shape
    elif k.op == "io":
        inputs = [helper.make_tensor_value_info("x", f32, [1, k.cin])]
        nodes.append(helper.make_node("Identity", ["x"], ["out"]))
        y_shape = [1, k.cin]
    else:
        raise ValueError(f"no micro-model for kernel op {k.op!r}")
    graph = helper.make_graph(nodes, f"edgeslim_{k.op}", inputs,
                              [helper.make_tensor_value_info("out", f32, y_shape)], initializer=inits)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if k.weight_only else [])
    model = helper.make_model(graph, opset_imports=opsets,
                              producer_name="edgeslim-calibrate")
    model.ir_version = IR_VERSION
    return model


def chain_model(kernels: Sequence[Kernel], acts: Sequence[bool], seed: int = 0) -> onnx.ModelProto:
    """Kernels connected output to input, each as its :func:`micro_model`; ``acts[i]`` False drops
    the ReLU after kernel ``i`` (the two halves of a low-rank pair meet without one). An ``add``
    kernel takes the previous kernel's output and, as its second input, the output of the kernel
    two back (a residual block: conv, conv, add).

    Example:
        >>> a = Kernel("conv", 8, cin=8, cout=8, k=3, h=8, w=8, ho=8, wo=8)
        >>> [n.op_type for n in chain_model([a, a], [False]).graph.node].count("Relu")
        1
    """
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    prev = "x"
    outs: list[str] = []
    for i, k in enumerate(kernels):
        g = micro_model(k, seed + i).graph
        last = i == len(kernels) - 1
        drop_act = not last and not acts[i]
        rename = {"x": prev, "out": "out" if last else f"k{i}_out"}
        if k.op == "add":
            rename["x2"] = _residual_source(kernels, i, outs)
        if drop_act:  # the Relu's input becomes the kernel's output
            relu = next(n for n in g.node if n.op_type == "Relu" and n.output[0] == "out")
            rename[relu.input[0]] = rename["out"]
        for n in g.node:
            if drop_act and n.op_type == "Relu" and n.output[0] == "out":
                continue
            new = onnx.NodeProto()
            new.CopyFrom(n)
            new.input[:] = [rename.get(t, f"k{i}_{t}") if t else t for t in n.input]
            new.output[:] = [rename.get(t, f"k{i}_{t}") for t in n.output]
            nodes.append(new)
        for t in g.initializer:
            new_t = onnx.TensorProto()
            new_t.CopyFrom(t)
            new_t.name = f"k{i}_{t.name}"
            inits.append(new_t)
        prev = rename["out"]
        outs.append(prev)
        if i == 0:
            inputs = [g.input[0]]
        outputs = list(g.output)
    weight_only = any(k.weight_only for k in kernels)
    graph = helper.make_graph(nodes, "edgeslim_chain", inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if weight_only else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgeslim-calibrate")
    model.ir_version = IR_VERSION
    keep_pools_float(model)  # as export does: pools next to dequantized layers stay float
    return model


def _residual_source(kernels: Sequence[Kernel], i: int, outs: Sequence[str]) -> str:
    """What the ``add`` at ``i`` adds to the previous kernel's output: the output of the kernel two
    back (conv, conv, add) or, after an inverted residual (three convs), the chain's input."""
    j = _residual_index(kernels, i)
    return "x" if j < 0 else outs[j]


def _residual_index(kernels: Sequence[Kernel], i: int) -> int:
    if i == 3 and all(k.op == "conv" for k in kernels[:3]) and kernels[1].groups > 1:
        return -1
    if i >= 3 and kernels[i - 3].op == "add":  # a block after a block: the identity shortcut from its add
        return i - 3
    return i - 2


def random_chain(rng: np.random.Generator) -> tuple[list[Kernel], list[bool]]:
    """2-8 connected convolutions (or Linears) at one spatial size, each at a random bit-width,
    with channel counts drawn like :func:`random_kernel` draws them; some start with a first
    layer (1-3 input channels) or put a max pool between two convs, some are residual blocks
    (conv, conv, add; some go on into a second block, whose add takes the first add's output,
    and some end in a global pool and a Linear), some inverted residuals (1x1 expand, depthwise
    3x3, 1x1 project, add) and some classifier heads."""
    def ch() -> int:
        width = int(rng.choice(_CHANNELS[:10]))
        return width if rng.random() < 0.5 else max(2, int(width * rng.uniform(0.2, 1.0)))

    def bits() -> int:
        return int(rng.choice((32, 8, 4), p=(0.4, 0.4, 0.2)))

    for _ in range(100):
        n = int(rng.integers(2, 5))
        gemm = rng.random() < 0.2
        hw = 1 if gemm else int(rng.choice((4, 8, 8, 14, 16, 16, 28, 32, 32, 56)))
        c = ch()
        if not gemm and rng.random() < 0.25:  # an inverted residual: 1x1 expand, depthwise 3x3, 1x1 project
            c = int(rng.choice(_CHANNELS[:8]))
            mid = c * int(rng.choice((1, 4, 6)))
            stride = 2 if rng.random() < 0.25 else 1
            ho = _out_hw(hw, 3, stride)
            kernels = [Kernel("conv", bits(), c, mid, 1, 1, 1, hw, hw, hw, hw),
                       Kernel("conv", 32 if rng.random() < 0.5 else bits(), mid, mid, 3, stride, mid, hw, hw, ho, ho),
                       Kernel("conv", bits(), mid, c, 1, 1, 1, ho, ho, ho, ho)]
            acts = [True, True]
            if stride == 1 and rng.random() < 0.6:
                kernels.append(Kernel("add", 32, c, c, h=ho, w=ho, ho=ho, wo=ho))
                acts.append(False)
            if sum(k.macs for k in kernels) <= MAX_MACS:
                return kernels, acts
            continue
        if not gemm and rng.random() < 0.3:  # residual blocks: conv, conv, add(+ReLU), then what follows an add
            ksz = int(rng.choice((1, 3, 3)))
            kernels = [Kernel("conv", bits(), c, c, ksz, 1, 1, hw, hw, hw, hw),
                       Kernel("conv", bits(), c, c, ksz, 1, 1, hw, hw, hw, hw),
                       Kernel("add", 32, c, c, h=hw, w=hw, ho=hw, wo=hw)]
            acts = [True, False]
            # networks run an add into the next block (its conv and, through the identity
            # shortcut, its add) or into the classifier's global pool: those boundaries need
            # chains too, or only whole networks would ever fit them
            if rng.random() < 0.5:
                kernels += [Kernel("conv", bits(), c, c, ksz, 1, 1, hw, hw, hw, hw),
                            Kernel("conv", bits(), c, c, ksz, 1, 1, hw, hw, hw, hw),
                            Kernel("add", 32, c, c, h=hw, w=hw, ho=hw, wo=hw)]
                acts += [True, True, False]
            if rng.random() < 0.3:
                kernels += [Kernel("gpool", 32, c, c, h=hw, w=hw), Kernel("gemm", bits(), c, int(rng.choice((10, 100))))]
                acts += [True, True]
            if sum(k.macs for k in kernels) <= MAX_MACS:
                return kernels, acts
            continue
        if not gemm and rng.random() < 0.3:  # a classifier head: conv, global pool and flatten, 1-2 Linears
            cout = ch()
            kernels = [Kernel("conv", bits(), c, cout, int(rng.choice((1, 3))), 1, 1, hw, hw, hw, hw),
                       Kernel("gpool", 32, cout, cout, h=hw, w=hw)]
            kernels += [Kernel("gemm", bits(), cout, ch())] if rng.random() < 0.5 else []
            kernels.append(Kernel("gemm", bits(), kernels[-1].cout, int(rng.choice((10, 100, 1000)))))
            if sum(k.macs for k in kernels) <= MAX_MACS:
                return kernels, [True, True] + [bool(rng.random() < 0.75)] * (len(kernels) - 3)
            continue
        kernels = []
        if not gemm and rng.random() < 0.2:  # a first layer: few input channels, NCHW input
            kernels.append(Kernel("conv", bits(), int(rng.choice((1, 3))), c, 3, 1, 1, hw, hw, hw, hw))
        for _ in range(n):
            cout = ch()
            if gemm:
                kernels.append(Kernel("gemm", bits(), c, cout))
            else:
                if kernels and hw >= 8 and rng.random() < 0.2:  # a max pool halving the map
                    pk = int(rng.choice((2, 3)))
                    kernels.append(Kernel("pool", 32, c, c, pk, 2, 1, hw, hw, hw // 2, hw // 2))
                    hw //= 2
                ksz = int(rng.choice((1, 3, 3)))
                kernels.append(Kernel("conv", bits(), c, cout, ksz, 1, 1, hw, hw, hw, hw))
            c = cout
        n = len(kernels)
        # a pool has no ReLU of its own to drop
        acts = [k.op in ("pool", "gpool") or bool(rng.random() < 0.75) for k in kernels[:-1]]
        if sum(k.macs for k in kernels) <= MAX_MACS:
            return kernels, acts
    raise RuntimeError("could not draw a kernel chain under the MAC limit")


def chain_edges(kernels: Sequence[Kernel], acts: Sequence[bool]) -> list[tuple[int, int, bool]]:
    """The edges of a chain (see :func:`chain_model`), in the form :func:`extract_graph` gives.

    Example:
        >>> c = Kernel("conv", 32, cin=8, cout=8, k=3, h=8, w=8, ho=8, wo=8)
        >>> chain_edges([c, c, Kernel("add", cin=8, cout=8, h=8, w=8, ho=8, wo=8)], [True, False])
        [(0, 1, True), (1, 2, False), (0, 2, True)]
    """
    # a pool's ``acts`` entry is True by convention (it has no ReLU to drop); nothing activates its output
    act = [bool(a) and k.op not in ("pool", "gpool") for k, a in zip(kernels, acts)]
    edges = [(i, i + 1, act[i]) for i in range(len(kernels) - 1)]
    edges += [(j, i, act[j]) for i, k in enumerate(kernels) if k.op == "add" and i >= 2
              for j in [_residual_index(kernels, i)] if j >= 0]
    return edges


def _out_hw(h: int, k: int, s: int) -> int:
    return (h + 2 * (k // 2) - k) // s + 1


def random_kernel(ktype: str, rng: np.random.Generator) -> Kernel:
    """One random configuration of ``ktype``, concentrated on shapes searched models have.

    Channel counts are typical widths times a random keep ratio (pruned layers), and with
    probability 0.3 a small rank (the thin half of a low-rank pair).
    """
    variant, bits_s = ktype.split("@")
    bits = int(bits_s)

    def ch() -> int:
        width = int(rng.choice(_CHANNELS))
        # half the draws are the widths networks are built with, half are pruned widths
        return width if rng.random() < 0.5 else max(2, int(width * rng.uniform(0.2, 1.0)))

    def small() -> int:
        return int(rng.integers(2, 49))

    for _ in range(100):
        hw = int(rng.choice(_SPATIAL))
        if variant == "gemm":
            cin, cout = int(rng.choice(_CHANNELS + (768, 1024, 2048)) * rng.uniform(0.2, 1)), ch()
            if rng.random() < 0.3:
                cin, cout = (small(), cout) if rng.random() < 0.5 else (cin, small())
            k = Kernel("gemm", bits, max(cin, 2), cout)
        elif variant in ("conv_kxk", "conv_pw", "conv_group", "conv_dw"):
            ksz = 1 if variant == "conv_pw" else int(rng.choice((3, 3, 5)))
            stride = int(rng.choice((1, 1, 2)))
            if variant == "conv_dw":
                cin = cout = groups = ch()
            elif variant == "conv_group":
                groups = int(rng.choice((2, 4, 8)))
                cin, cout = groups * max(1, ch() // groups), groups * max(1, ch() // groups)
            else:
                groups = 1
                cin, cout = ch(), ch()
                if variant == "conv_kxk" and rng.random() < 0.15:
                    cin = int(rng.choice((1, 3)))  # network stems
                if rng.random() < 0.3:
                    if variant == "conv_kxk":
                        cout = small()
                    else:
                        cin = small()
            ho = _out_hw(hw, ksz, stride)
            k = Kernel("conv", bits, cin, cout, ksz, stride, groups, hw, hw, ho, ho)
        elif variant in ("add", "act"):
            c = ch()
            k = Kernel(variant, 32, c, c, h=hw, w=hw, ho=hw, wo=hw)
        elif variant == "pool":
            c, ksz = ch(), int(rng.choice((2, 3)))
            ho = (hw - ksz) // 2 + 1
            if ho < 1:
                continue
            k = Kernel("pool", 32, c, c, ksz, 2, 1, hw, hw, ho, ho)
        elif variant == "gpool":
            c = ch()
            k = Kernel("gpool", 32, c, c, h=hw, w=hw)
        else:
            raise ValueError(f"unknown kernel type {ktype!r}")
        if k.macs <= MAX_MACS:
            return k
    raise RuntimeError(f"could not draw a {ktype} kernel under {MAX_MACS} MACs")


def neighbour(k: Kernel, rng: np.random.Generator) -> Kernel:
    """A configuration near ``k``: channels scaled by up to 1.5x either way, spatial size kept."""
    def jitter(c: int) -> int:
        return max(2, int(round(c * math.exp(rng.uniform(-0.4, 0.4)))))

    if k.op == "conv" and k.groups > 1:
        if k.groups == k.cin:
            c = jitter(k.cin)
            return dataclasses.replace(k, cin=c, cout=c, groups=c)
        g = k.groups
        return dataclasses.replace(k, cin=g * max(1, jitter(k.cin) // g), cout=g * max(1, jitter(k.cout) // g))
    if k.op in ("conv", "gemm"):
        return dataclasses.replace(k, cin=jitter(k.cin) if k.cin > 3 else k.cin, cout=jitter(k.cout))
    c = jitter(k.cin)
    return dataclasses.replace(k, cin=c, cout=c)


def design(types: Sequence[str], per_type: int, seed: int) -> list[Kernel]:
    """A random initial design of ``per_type`` kernels for each type."""
    rng = np.random.default_rng(seed)
    return [random_kernel(t, rng) for t in types for _ in range(per_type)]


def measuring_order(kernels: Sequence[Kernel], seed: int) -> list[Kernel]:
    """``kernels`` in the random order calibration measures them in.

    A shared VM holds one speed state for seconds to minutes and then moves 10-20 % (on the
    development VM the same 160 small kernels, timed three times within four minutes, came out
    at 0.84-1.18x their calibrated times per stretch of 20, but within 5-12 % of each other inside
    a stretch). Measured in a row, one type's kernels, or one network's focus kernels, would all
    carry the state of their stretch, and a network's prediction its error whole; in random
    order each kernel samples its own moment and the errors average out over a network's sum.

    Example:
        >>> ks = design(["gemm@32"], 5, 0)
        >>> sorted(map(repr, measuring_order(ks, 0))) == sorted(map(repr, ks))
        True
    """
    order = np.random.default_rng(seed + 3).permutation(len(kernels))
    return [kernels[i] for i in order]


@dataclasses.dataclass
class CalibrationResult:
    """Measurements and the fitted model of one calibration run."""

    kernels: list[Kernel]
    measurements: list[dict[str, Any]]
    model: LatencyModel
    rounds: list[dict[str, float]]
    chains: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    track: SpeedTrack | None = None  # the device's speed over the calibration (its reference() per kernel)
    # what was measured again because the device ran off its usual speed (None: nothing was)
    remeasured: dict[str, Any] | None = None


# a compute-bound float conv, an int8 conv, a memory-bound depthwise conv and a Linear: timed at
# the start and end of a calibration and again by check-latency, they tell how far the device's
# speed has moved since (a shared VM's neighbours, a board's thermal state)
REFERENCE_KERNELS: tuple[Kernel, ...] = (
    Kernel("conv", 32, 64, 64, 3, 1, 1, 28, 28, 28, 28),
    Kernel("conv", 8, 64, 64, 3, 1, 1, 28, 28, 28, 28),
    Kernel("conv", 32, 96, 96, 3, 1, 96, 56, 56, 56, 56),
    Kernel("gemm", 32, 512, 512),
)


def measure_reference(threads: int, workdir: Path) -> list[float]:
    """p50 in ms of each of :data:`REFERENCE_KERNELS`, each in its own fresh session."""
    out = _measure_models([functools.partial(micro_model, k) for k in REFERENCE_KERNELS], threads, workdir,
                          10_000_000, lambda: None, sizes=[len(REFERENCE_KERNELS)])
    return [float(m["p50_ms"]) for m in out]


def reference_from(first: Sequence[float], last: Sequence[float]) -> list[float]:
    """One reference time per kernel from two timings of the set (their mean)."""
    return [(a + b) / 2 for a, b in zip(first, last)]


# micro-models measured between two timings of the reference kernels during a calibration
TRACK_EVERY = 200


class SpeedTrack:
    """How fast the device ran over a calibration, from reference-kernel timings taken between
    micro-models (a shared VM's neighbours or a board heating up move it within minutes).

    ``factor(seq)`` is the device's relative slowness when measurement number ``seq`` was taken
    (1.0 = the calibration's median state): the geometric mean over the reference kernels of
    their time at the nearest timings over their median, smoothed over three neighbouring
    timings and interpolated by position. Calibration records and reports it and measures
    again what it timed more than ``_runner.EXCURSION`` off (:func:`_remeasure`); it never
    rescales measurements by it (on the development VM that made network predictions worse: a
    few kernels' drift does not carry over to every kernel, see the README).

    Example:
        >>> t = SpeedTrack()
        >>> for seq, scale in [(0, 1.0), (100, 1.0), (200, 1.2), (300, 1.2), (400, 1.2)]:
        ...     t.add(seq, [scale * 1.0, scale * 2.0])
        >>> round(t.factor(0), 3), round(t.factor(350), 3)
        (0.833, 1.0)
    """

    def __init__(self) -> None:
        self.points: list[tuple[int, list[float]]] = []
        self.seq = 0  # position of the next measurement (used while measuring)
        self.timed_at: int | None = None  # ``seq`` at the last timing (None: not timed yet)
        # Identity models timed with each timing: the per-inference overhead, which every kernel's
        # time is taken net of, is then the calibration's typical value, not one early sample
        self.io: list[tuple[Kernel, dict[str, Any]]] = []

    def add(self, seq: int, p50_ms: Sequence[float]) -> None:
        """Record one timing of the reference kernels, taken before measurement ``seq``."""
        self.points.append((int(seq), [float(v) for v in p50_ms]))
        self._curve: tuple[np.ndarray, np.ndarray] | None = None

    def reference(self) -> list[float]:
        """Each reference kernel's median time over the calibration (the state ``factor`` 1.0 means)."""
        return [float(v) for v in np.median(np.array([p for _, p in self.points]), axis=0)] if self.points else []

    def _fitted(self) -> tuple[np.ndarray, np.ndarray]:
        if getattr(self, "_curve", None) is None:
            seqs = np.array([s for s, _ in self.points], dtype=float)
            self._curve = (seqs, _runner.speed_factors([p for _, p in self.points]))
        return self._curve  # type: ignore[return-value]

    def factor(self, seq: int) -> float:
        """Relative slowness of the device at measurement ``seq`` (1.0 with fewer than three timings)."""
        if len(self.points) < 3:
            return 1.0
        seqs, smooth = self._fitted()
        return float(np.interp(seq, seqs, smooth))

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the timings by measurement position."""
        return {"every": TRACK_EVERY, "points": [[s, p] for s, p in self.points]}

    @classmethod
    def from_entries(cls, entries: Sequence[Mapping[str, Any]]) -> SpeedTrack:
        """The track of a kit's measured entries: each run of consecutive reference entries is one
        timing, positioned at the entry after it."""
        t = cls()
        for pos, run in _runner.reference_timings(entries):
            if len(run) == len(REFERENCE_KERNELS):
                t.add(pos, [float(entries[run[j]]["p50_ms"]) for j in range(len(REFERENCE_KERNELS))])
        return t


speed_ratio = _runner.speed_ratio  # check-latency and the CLI compare reference timings with it


# lone micro-models timed together (interleaved, see _runner.time_group): long enough a stretch
# to average the VM's speed states, short enough that a group's sessions stay small
GROUP = 8


def _measure_models(builders: Sequence[Callable[[int], onnx.ModelProto]], threads: int, workdir: Path,
                    offset: int, tick: Callable[[], None], energy_reader: Any = None,
                    track: SpeedTrack | None = None, sizes: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Save, measure and delete the models, ``sizes`` of them at a time (default ``GROUP``),
    each group interleaved; ``builder(seed)`` makes model ``offset + i``.

    With ``track`` each measurement gets its position ``seq`` in the calibration and the
    reference kernels are timed before the group that reaches each ``TRACK_EVERY``-th one."""
    if sizes is None:
        sizes = [min(GROUP, len(builders) - i) for i in range(0, len(builders), GROUP)]
    out: list[dict[str, Any]] = []
    at = 0
    for size in sizes:
        paths = []
        for i in range(at, at + size):
            paths.append(workdir / f"m{offset + i}.onnx")
            onnx.save(builders[i](offset + i), str(paths[-1]))
        if track is not None and (track.timed_at is None or track.seq // TRACK_EVERY > track.timed_at // TRACK_EVERY):
            time_track(track, threads, workdir)
        group = _runner.measure_files([str(q) for q in paths], threads, list(range(offset + at, offset + at + size)),
                                      energy_reader=energy_reader)
        for m, q in zip(group, paths):
            if track is not None:
                m["seq"] = track.seq
                track.seq += 1
            out.append(m)
            q.unlink()
            tick()
        at += size
    return out


def time_track(track: SpeedTrack, threads: int, workdir: Path) -> None:
    """One timing for ``track``: the reference kernels and the Identity (overhead) models, together."""
    io = io_kernels()
    ks = list(REFERENCE_KERNELS) + io
    got = _measure_models([functools.partial(micro_model, k) for k in ks], threads, workdir, 20_000_000,
                          lambda: None, sizes=[len(ks)])
    track.add(track.seq, [float(m["p50_ms"]) for m in got[:len(REFERENCE_KERNELS)]])
    track.io += zip(io, got[len(REFERENCE_KERNELS):])
    track.timed_at = track.seq


def _measure(kernels: Sequence[Kernel], threads: int, workdir: Path, offset: int,
             tick: Callable[[], None], energy_reader: Any = None, track: SpeedTrack | None = None
             ) -> list[dict[str, Any]]:
    return _measure_models([functools.partial(micro_model, k) for k in kernels], threads, workdir, offset,
                           tick, energy_reader, track)


def io_kernels() -> list[Kernel]:
    """Identity models of several sizes; they calibrate the per-inference overhead."""
    return [Kernel("io", cin=n, cout=n) for n in IO_SIZES]


def _fit(kernels: Sequence[Kernel], meas: Sequence[dict[str, Any]], device: str,
         select: bool = False) -> LatencyModel:
    return LatencyModel(device=device).fit(kernels, meas, select=select)


def calibrate(device: str, threads: int, mode: str = "quick", seed: int = 0,
              progress: Callable[[int, int], None] | None = None, energy_reader: Any = None,
              types: Sequence[str] = KERNEL_TYPES, focus: Sequence[Kernel] = (),
              networks: Sequence[Mapping[str, Any]] = (), say: Callable[[str], None] | None = None
              ) -> CalibrationResult:
    """Measure an initial design, then adaptively add points where the model errs most.

    Each round draws fresh validation kernels, records the current model's error on them
    (reported as that round's held-out error), and measures neighbours of the worst quarter.
    ``focus`` kernels (those the models to be searched run, see ``workload_kernels``) join the
    initial design: the model is then exact where the search will ask it most. ``networks``
    (``{"name", "path", "kernels", "edges"}``: whole candidates of those models, exported as
    they would ship) are measured after the chains and fit the boundary savings with them.

    Measurements taken while the device ran more than ``EXCURSION`` off its usual speed (the
    speed track's median) are measured again once it is back (see :func:`_remeasure`); ``say``
    receives what calibration waits for.
    """
    per_type, rounds, n_val, n_nb = MODES[mode]
    rng = np.random.default_rng(seed + 1)
    drawn = [random_chain(rng) for _ in range(CHAINS[mode])]
    total = len(types) * (per_type + rounds * (n_val + n_nb)) + sum(len(ks) + 1 for ks, _ in drawn)
    total += len(focus) + sum(len(n["kernels"]) + 1 for n in networks)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    def grow(n: int) -> None:
        nonlocal total
        total += n

    track = SpeedTrack()

    def fit_so_far() -> LatencyModel:  # with the overhead timings taken so far
        return _fit(kernels + [k for k, _ in track.io], meas + [m for _, m in track.io], device)

    with tempfile.TemporaryDirectory(prefix="edgeslim-cal-") as tmp:
        work = Path(tmp)
        kernels = measuring_order(design(types, per_type, seed) + list(focus), seed)
        meas = _measure(kernels, threads, work, 0, tick, energy_reader, track)
        # chains first: their kernels, measured alone too, join the kernel design
        units = [_Unit([functools.partial(micro_model, k)], [m]) for k, m in zip(kernels, meas)]
        chains, lone_kernels, lone_meas, chain_units = _measure_chains(drawn, threads, work, len(kernels), tick,
                                                                       energy_reader, track, networks)
        kernels += lone_kernels
        meas += lone_meas
        model = fit_so_far()
        history = []
        for r in range(rounds):
            val = [random_kernel(t, rng) for t in types for _ in range(n_val)]
            vm = _measure(val, threads, work, len(kernels), tick, energy_reader, track)
            pred = [model.predict([k], m["io_bytes"])[0] for k, m in zip(val, vm)]
            errs = np.array([abs(p / m["p50_ms"] - 1) for p, m in zip(pred, vm)])
            history.append({"round": r + 1, "heldout_mape": float(errs.mean()),
                            "heldout_within_10pct": float((errs <= 0.10).mean()), "points": len(val)})
            worst = np.argsort(-errs)[: len(types) * n_nb]
            nb = [neighbour(val[i], rng) for i in worst]
            nb = [k if k.macs <= MAX_MACS else val[i] for k, i in zip(nb, worst)]
            nm = _measure(nb, threads, work, len(kernels) + len(val), tick, energy_reader, track)
            units += [_Unit([functools.partial(micro_model, k)], [m]) for k, m in zip(val + nb, vm + nm)]
            kernels += val + nb
            meas += vm + nm
            if r < rounds - 1:  # the last round's points go into the final fit below
                model = fit_so_far()
        time_track(track, threads, work)  # the closing timing
        redo = _remeasure(units + chain_units, track, threads, work, len(kernels), tick, grow, energy_reader, say)
        kernels += [k for k, _ in track.io]
        meas += [m for _, m in track.io]
        # full mode chooses each type's regressor by cross-validation (about a minute of fitting)
        model = _fit(kernels, meas, device, select=mode == "full")
        _fit_chains(model, chains)
    return CalibrationResult(kernels, meas, model, history, chains, track, redo)


@dataclasses.dataclass
class _Unit:
    """Models measured together and the records their results live in (updated in place): a
    lone kernel, or a chain or network with its parts (``whole`` True: the first record also
    holds the parts' times under ``lone``)."""

    builders: list[Callable[[int], onnx.ModelProto]]
    records: list[dict[str, Any]]
    whole: bool = False


_RESULT_KEYS = ("p50_ms", "p95_ms", "runs", "rejected", "io_bytes", "seq", "energy_mj", "wall_s")


def _remeasure(units: Sequence[_Unit], track: SpeedTrack, threads: int, workdir: Path, offset: int,
               tick: Callable[[], None], grow: Callable[[int], None], energy_reader: Any = None,
               say: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """Measure again the units timed while the device ran off its usual speed.

    A board that throttles or a VM whose neighbour gets busy runs everything 20-70 % slower
    for minutes (a Xeon host lent for a session slowed by 50-70 % over the last ~300 of 1,701
    micro-models, and that profile predicted candidates with MAPE 22 % against 9 % for one
    calibrated right after). Rescaling such measurements by the reference kernels' slowdown
    helped little (to 19 %): kernels do not all slow alike. So the calibration waits until the
    reference kernels run within ``EXCURSION`` of their median again (``_runner.WAIT``) and
    measures those units anew, keeping each new result whose moment was nearer the usual
    state. Returns what it did (None when no unit was off)."""
    if len(track.points) < 3:
        return None
    before = {id(u): track.factor(int(u.records[0]["seq"])) for u in units}
    off = [u for u in units if _runner.away(before[id(u)])]
    if not off:
        return None
    n = sum(len(u.builders) for u in off)
    worst = max(before[id(u)] for u in off)
    summary: dict[str, Any] = {"measurements": n, "worst_factor": worst}
    back, now, waited = _runner.wait_until_usual(lambda: measure_reference(threads, workdir), track.reference(),
                                                 say=say)
    summary.update(back=back, waited_s=waited, factor_then=now, replaced=0)
    if not back:
        return summary
    grow(n)
    time_track(track, threads, workdir)
    lone = [u for u in off if not u.whole]
    sizes = [min(GROUP, len(lone) - i) for i in range(0, len(lone), GROUP)] + [len(u.builders) for u in off if u.whole]
    order = lone + [u for u in off if u.whole]
    got = _measure_models([b for u in order for b in u.builders], threads, workdir, offset, tick, energy_reader,
                          track, sizes=sizes)
    time_track(track, threads, workdir)
    at = 0
    for u in order:
        new = got[at: at + len(u.builders)]
        at += len(u.builders)
        if abs(math.log(track.factor(int(new[0]["seq"])))) >= abs(math.log(before[id(u)])):
            continue  # the device was no nearer its usual state this time
        for rec, m in zip(u.records, new):
            for key in _RESULT_KEYS:
                rec.pop(key, None)
            rec.update(m)
        if u.whole:
            u.records[0]["lone"] = [{k: m[k] for k in _LONE_KEYS if k in m} for m in new[1:]]
        summary["replaced"] += len(u.builders)
    return summary


_LONE_KEYS = ("p50_ms", "p95_ms", "io_bytes", "seq")


def _measure_chains(drawn: Sequence[tuple[list[Kernel], list[bool]]], threads: int, workdir: Path, offset: int,
                    tick: Callable[[], None], energy_reader: Any = None, track: SpeedTrack | None = None,
                    networks: Sequence[Mapping[str, Any]] = (),
                    ) -> tuple[list[dict[str, Any]], list[Kernel], list[dict[str, Any]], list[_Unit]]:
    """Each chain (then each focus network) timed together with each of its kernels alone
    (interleaved, the same machine states): its boundary saving is then measured lone times less its own, free of the
    kernel model's error and of the device's drift between the two. Returns the chain and network
    records, the lone kernels with their measurements, and each record as a unit with its parts
    (for :func:`_remeasure`)."""
    items: list[tuple[Callable[[int], onnx.ModelProto], list[Kernel], dict[str, Any]]] = []
    for ks, acts in drawn:
        items.append((functools.partial(chain_model, ks, acts), list(ks),
                      {"chain": {"kernels": [dataclasses.asdict(k) for k in ks], "acts": list(acts)}}))
    for net in networks:
        ks = [dataclasses.replace(k, layer="") for k in net["kernels"]]
        items.append((functools.partial(_load, str(net["path"])), ks, {"network": network_record(net)}))
    builders: list[Callable[[int], onnx.ModelProto]] = []
    for build, ks, _ in items:
        builders.append(build)
        builders += [functools.partial(micro_model, k) for k in ks]
    meas = _measure_models(builders, threads, workdir, offset, tick, energy_reader, track,
                           sizes=[1 + len(ks) for _, ks, _ in items])
    records, lone_kernels, lone_meas, units, at = [], [], [], [], 0
    for _, ks, what in items:
        whole, parts = meas[at], meas[at + 1: at + 1 + len(ks)]
        unit_builders = builders[at: at + 1 + len(ks)]
        at += 1 + len(ks)
        records.append({**what, "lone": [{k: m[k] for k in _LONE_KEYS if k in m} for m in parts], **whole})
        units.append(_Unit(unit_builders, [records[-1], *parts], whole=True))
        lone_kernels += ks
        lone_meas += parts
    return records, lone_kernels, lone_meas, units


def _fit_chains(model: LatencyModel, chains: Sequence[dict[str, Any]]) -> None:
    """Fit the boundary savings from chain records and whole-network records (``network``: a
    focus model's candidate with its kernels and edges), each against its own lone kernels, and
    the tail mix (:meth:`LatencyModel.fit_tail`) from their p95/p50 ratios."""
    rows, tails, nets = [], [], []
    for c in chains:
        if "network" in c:
            ks = [Kernel(**k) for k in c["network"]["kernels"]]
            edges = [(int(a), int(b), bool(act)) for a, b, act in c["network"]["edges"]]
        else:
            ks = [Kernel(**k) for k in c["chain"]["kernels"]]
            edges = chain_edges(ks, c["chain"]["acts"])
        if all(model.covers(k) for k in ks):
            lone = c.get("lone")
            # the lone kernels' own times, each less the overhead its micro-model paid
            lone_ms = None if not lone else sum(float(m["p50_ms"]) - model.overhead_ms(float(m["io_bytes"]))
                                                for m in lone)
            rows.append((ks, edges, float(c["p50_ms"]), float(c["io_bytes"]), lone_ms))
            if float(c.get("p95_ms", 0.0)) > float(c["p50_ms"]) > 0:
                (nets if "network" in c else tails).append((ks, float(c["p50_ms"]), float(c["p95_ms"]),
                                                            float(c["io_bytes"])))
    model.fit_boundaries(rows)
    # how kernels' slow runs add up in an inference: from whole networks where the calibration
    # measured some (short chains' tails coincide more than a network's many kernels' do)
    model.fit_tail(nets if len(nets) >= 3 else tails + nets)


def network_record(net: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON form of a focus network (see :func:`calibrate`): name, kernels and edges."""
    return {"name": net["name"], "kernels": [dataclasses.asdict(k) for k in net["kernels"]],
            "edges": [list(e) for e in net["edges"]]}


def _load(path: str, seed: int) -> onnx.ModelProto:
    return onnx.load(path)


# ---- remote kits -----------------------------------------------------------------------------
def start_kit(kit_dir: Path) -> None:
    """Make a kit's ``models/`` folder and write the reference kernels' micro-models into it
    (``models/ref_I.onnx``; :func:`reference_entries` times them)."""
    (kit_dir / "models").mkdir(parents=True, exist_ok=True)
    for i, k in enumerate(REFERENCE_KERNELS):
        onnx.save(micro_model(k), str(kit_dir / f"models/ref_{i}.onnx"))


def reference_entries(group: str) -> list[dict[str, Any]]:
    """Kit entries that time the reference kernels once, together as ``group``.

    Example:
        >>> [e["file"] for e in reference_entries("g1")][:2]
        ['models/ref_0.onnx', 'models/ref_1.onnx']
    """
    return [{"file": f"models/ref_{i}.onnx", "reference": i, "group": group} for i in range(len(REFERENCE_KERNELS))]


def seal_kit(kit_dir: Path, identity: Any, fields: Mapping[str, Any]) -> Path:
    """Write ``kit.json`` (kit version, an id hashed from ``identity``, then ``fields``) and copy
    the runner in as ``run_kit.py``; returns ``kit_dir``."""
    kit_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    manifest = {"kit_version": _runner.KIT_VERSION, "kit_id": kit_id, **fields}
    (kit_dir / "kit.json").write_text(json.dumps(manifest, indent=1))
    shutil.copyfile(_runner.__file__, kit_dir / "run_kit.py")
    return kit_dir


def write_kit(kit_dir: Path, threads: int, mode: str = "full", seed: int = 0, focus: Sequence[Kernel] = (),
              focus_info: Mapping[str, Any] | None = None, networks: Sequence[Mapping[str, Any]] = ()) -> Path:
    """A self-contained kit: micro-models, ``kit.json`` and ``run_kit.py`` (numpy + onnxruntime).

    Remote devices cannot refit between rounds, so the kit holds a fixed design the size of the
    mode's whole adaptive budget, plus the ``focus`` kernels, the chains and the focus
    ``networks`` (each timed together with its kernels alone); the reference kernels and the
    Identity (overhead) models are timed at the start, every ``TRACK_EVERY`` models and at the
    end. Entries with the same ``group`` are timed together, interleaved.
    """
    per_type, rounds, n_val, n_nb = MODES[mode]
    kernels = measuring_order(design(KERNEL_TYPES, per_type + rounds * (n_val + n_nb), seed) + list(focus), seed)
    start_kit(kit_dir)
    entries: list[dict[str, Any]] = []
    for i, k in enumerate(io_kernels()):
        onnx.save(micro_model(k), str(kit_dir / f"models/io_{i}.onnx"))
    since = 0
    groups = 0  # entries with one "group" are timed together, interleaved (see _runner.time_group)

    def new_group() -> str:
        nonlocal groups
        groups += 1
        return f"g{groups}"

    def time_reference(force: bool = False) -> bool:
        # the device's speed over the run (see SpeedTrack), timed every TRACK_EVERY models
        nonlocal since
        if force or since >= TRACK_EVERY:
            g = new_group()
            entries.extend(reference_entries(g))
            entries.extend({"file": f"models/io_{i}.onnx", "kernel": dataclasses.asdict(k), "group": g}
                           for i, k in enumerate(io_kernels()))
            since = 0
            return True
        return False

    time_reference(force=True)
    g = new_group()
    for i, k in enumerate(kernels):
        if time_reference() or i % GROUP == 0:
            g = new_group()
        name = f"models/k{i:05d}.onnx"
        onnx.save(micro_model(k, seed=i), str(kit_dir / name))
        entries.append({"file": name, "kernel": dataclasses.asdict(k), "group": g})
        since += 1
    def add_with_parts(stem: str, what: dict[str, Any], ks: Sequence[Kernel], write: Callable[[Path], None]) -> None:
        # a chain or a whole network, then each of its kernels alone: one group, timed together
        nonlocal since
        time_reference()  # never between a model and its parts
        g = new_group()
        name = f"models/{stem}.onnx"
        write(kit_dir / name)
        entries.append({"file": name, **what, "parts": list(range(len(entries) + 1, len(entries) + 1 + len(ks))),
                        "group": g})
        for i, k in enumerate(ks):
            part = f"models/{stem}_{i}.onnx"
            onnx.save(micro_model(k, seed=len(entries)), str(kit_dir / part))
            entries.append({"file": part, "kernel": dataclasses.asdict(k), "group": g})
        since += 1 + len(ks)

    rng = np.random.default_rng(seed + 2)
    for j in range(CHAINS[mode]):
        ks, acts = random_chain(rng)
        add_with_parts(f"c{j:05d}", {"chain": {"kernels": [dataclasses.asdict(k) for k in ks], "acts": acts}}, ks,
                       lambda p, ks=ks, acts=acts: onnx.save(chain_model(ks, acts, seed=len(entries)), str(p)))
    for j, net in enumerate(networks):  # whole focus candidates, as they would ship
        add_with_parts(f"n{j:03d}", {"network": network_record(net)},
                       [dataclasses.replace(k, layer="") for k in net["kernels"]],
                       lambda p, net=net: shutil.copyfile(net["path"], p))
    time_reference(force=True)
    return seal_kit(kit_dir, entries, {"mode": mode, "threads": threads, "protocol": _runner.PROTOCOL,
                                       "entries": entries, **({"focus": dict(focus_info)} if focus_info else {})})


def fit_measurements(data: dict[str, Any], device: str) -> CalibrationResult:
    """Fit a model from a kit's ``measurements.json`` content.

    The reference kernels the kit times between its micro-models give the device's speed over
    the run (:class:`SpeedTrack`, recorded in the profile).
    """
    keys = ("p50_ms", "p95_ms", "runs", "rejected", "io_bytes")
    for i, e in enumerate(data["entries"]):
        missing = [k for k in keys if k not in e]
        if missing:
            raise ValueError(f"measurements.entries[{i}] lacks {missing}; re-run the kit's run_kit.py")
    every = [{**e, "seq": i} for i, e in enumerate(data["entries"])]
    track = SpeedTrack.from_entries(every)
    entries = [e for e in every if "kernel" in e]
    kernels = [Kernel(**e["kernel"]) for e in entries]
    meas = [{k: e[k] for k in (*keys, "seq")} for e in entries]
    chains = [{("network" if "network" in e else "chain"): e.get("network", e.get("chain")),
               **{k: e[k] for k in (*keys, "seq")},
               **({"lone": [{k: every[i][k] for k in _LONE_KEYS} for i in e["parts"]]} if "parts" in e else {})}
              for e in every if "chain" in e or "network" in e]
    model = _fit(kernels, meas, device, select=True)
    _fit_chains(model, chains)
    return CalibrationResult(kernels, meas, model, [], chains, track)


def refit(data: Mapping[str, Any], device: str) -> CalibrationResult:
    """Fit a profile's model anew, with this version's model code, from the measurements and
    chains the profile stores (``edgeslim calibrate --refit``: a newer edgeslim upgrades a
    profile without the device). Each kernel type's form is chosen by cross-validation for
    full-mode and kit profiles, as their first fit chose it.

    Example:
        >>> refit(json.loads(Path("studies/devices/pi5.json").read_text()), "pi5")  # doctest: +SKIP
    """
    entries = data.get("measurements")
    if not isinstance(entries, list) or not entries:
        raise ValueError("the profile stores no measurements to fit; calibrate the device again")
    keys = ("p50_ms", "p95_ms", "io_bytes")
    for i, e in enumerate(entries):
        missing = [k for k in ("kernel", *keys) if k not in e]
        if missing:
            raise ValueError(f"measurements[{i}] lacks {missing}; calibrate the device again")
    kernels = [Kernel(**e["kernel"]) for e in entries]
    meas = [{k: v for k, v in e.items() if k not in ("kernel", "type")} for e in entries]
    model = _fit(kernels, meas, device, select=data.get("mode") in ("full", "kit"))
    chains = list(data.get("chains") or [])
    _fit_chains(model, chains)
    return CalibrationResult(kernels, meas, model, list(data.get("rounds") or []), chains)


def fit_energy(kernels: Sequence[Kernel], meas: Sequence[dict[str, Any]], source: str) -> Any:
    """Fit energy constants to metered micro-model runs (non-negative least squares).

    Model per inference: Σ_bits e_mac(bits)·MACs + e_byte·bytes moved + P_static·latency.
    Returns ``None`` when the runs carry no energy readings (no meter).
    """
    from scipy.optimize import nnls

    from edgeslim.objectives._device import EnergyConstants

    rows, target = [], []
    for k, m in zip(kernels, meas):
        if "energy_mj" not in m:
            continue
        moved = k.weight_elems * k.bits / 8 + k.act_bytes * (k.in_elems + k.out_elems)
        cb = k.compute_bits
        rows.append([k.macs * (cb == 32), k.macs * (cb == 8), k.macs * (cb == 4), moved,
                     m["p50_ms"]])
        target.append(m["energy_mj"])
    if len(rows) < 10:
        return None
    a = np.array(rows, dtype=float)
    scale = np.maximum(a.max(axis=0), 1e-12)
    coef, _ = nnls(a / scale, np.array(target))
    coef = coef / scale
    pj = 1e9  # mJ -> pJ
    return EnergyConstants(mac_pj_by_bits={32: coef[0] * pj, 8: coef[1] * pj, 4: coef[2] * pj},
                           byte_pj=coef[3] * pj, static_w=float(coef[4]), source=source, measured=True)

"""Micro-models: single kernels and kernel chains as ONNX graphs (built with ``onnx``, no torch),
and the random designs calibration draws them from."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeslim.objectives._graph_fixes import keep_pools_float
from edgeslim.objectives.devices._kernels import Kernel
from edgeslim.spaces import NBITS_BLOCK

__all__ = ["CHAINS", "KERNEL_TYPES", "MODES", "chain_edges", "chain_model", "design", "measuring_order",
           "micro_model", "neighbour", "random_chain", "random_kernel"]

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

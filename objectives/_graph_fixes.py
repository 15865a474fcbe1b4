"""Graph rewrites applied to exported artifacts and to calibration chains alike (no torch here:
calibration kits build their models without it)."""

from __future__ import annotations

import numpy as np
import onnx

__all__ = ["drop_requantized_relus", "keep_pools_float"]


def _links(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """The node producing each tensor and the nodes consuming it."""
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    return producers, consumers


# pooling ops ONNX Runtime would otherwise run on uint8 with a slow generic kernel
_FLOAT_POOLS = ("MaxPool",)


def keep_pools_float(model: onnx.ModelProto) -> int:
    """Keep max-pooling float unless int8 convs stand on both sides; returns how many pools changed.

    ONNX Runtime moves a QuantizeLinear that follows a MaxPool to before it and then runs the
    pool on uint8 (its QDQ propagation and drop rules). Between two int8 convs (QLinearConv)
    that is its fast NHWC uint8 pool, and that case is left alone. Anywhere else it is a generic
    NCHW uint8 kernel, many times slower than the float pool (figures in studies/BENCHMARKS.md).
    There the pool's input gets a Q/DQ pair of its own whose scale is one float ulp above the output's,
    so the rules no longer match. Max commutes with the (monotone) quantization, so outputs do
    not change beyond exact rounding ties.

    Example:
        >>> keep_pools_float(onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], [])))
        0
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers, consumers = _links(graph)

    def int8_conv(n: onnx.NodeProto | None) -> bool:
        if n is None or n.op_type != "Conv" or len(n.input) < 2 or n.input[1] not in producers:
            return False
        dq = producers[n.input[1]]
        w = inits.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        return w is not None and w.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)

    def neighbour(tensor: str, up: bool) -> onnx.NodeProto | None:
        """The first node past Q/DQ/Relu up- or downstream of ``tensor`` (None at a fork)."""
        for _ in range(8):
            if up:
                nxt = [producers[tensor]] if tensor in producers else []
            else:
                nxt = consumers.get(tensor, [])
            if len(nxt) != 1:
                return None
            if nxt[0].op_type not in ("QuantizeLinear", "DequantizeLinear", "Relu"):
                return nxt[0]
            tensor = nxt[0].input[0] if up else nxt[0].output[0]
        return None

    changed, nodes = 0, []
    for node in graph.node:
        qs = [q for q in consumers.get(node.output[0], []) if q.op_type == "QuantizeLinear"]
        if node.op_type not in _FLOAT_POOLS or len(qs) != 1 or len(node.output) != 1 \
                or qs[0].input[1] not in inits or len(qs[0].input) < 3 or qs[0].input[2] not in inits \
                or int8_conv(neighbour(node.input[0], True)) and int8_conv(neighbour(node.output[0], False)):
            nodes.append(node)
            continue
        q = qs[0]
        scale = onnx.numpy_helper.to_array(inits[q.input[1]])
        tag = f"{node.name or node.output[0]}.float_in"
        nudged = np.nextafter(scale, np.float32(np.inf)).astype(scale.dtype)
        dq = producers.get(node.input[0])
        if dq is not None and dq.op_type == "DequantizeLinear":
            # the input is dequantized already: a changed scale on that side breaks the match
            if dq.input[1] in inits and np.array_equal(onnx.numpy_helper.to_array(inits[dq.input[1]]), scale):
                inits[q.input[1]].CopyFrom(onnx.numpy_helper.from_array(nudged, q.input[1]))
                changed += 1
            nodes.append(node)
            continue
        src = node.input[0]
        graph.initializer.append(onnx.numpy_helper.from_array(nudged, f"{tag}.scale"))
        nodes.append(onnx.helper.make_node("QuantizeLinear", [src, f"{tag}.scale", q.input[2]], [f"{tag}.q"],
                                           name=f"{tag}.Q"))
        nodes.append(onnx.helper.make_node("DequantizeLinear", [f"{tag}.q", f"{tag}.scale", q.input[2]],
                                           [f"{tag}.dq"], name=f"{tag}.DQ"))
        node.input[0] = f"{tag}.dq"
        nodes.append(node)
        changed += 1
    if changed:
        del graph.node[:]
        graph.node.extend(nodes)
    return changed


def drop_requantized_relus(model: onnx.ModelProto) -> int:
    """Remove ``DQ(s, z) -> Relu -> Q(s, z) -> DQ(s, z)`` where ``z`` is the uint8 minimum (and the
    same with a ReLU6 ``Clip`` whose top lies at or above the grid's); returns how many.

    On a uint8 grid that starts at zero the dequantized values are already non-negative, so the
    ReLU and the second Q/DQ pair change nothing. ONNX Runtime drops such a pair itself only
    when the tensor has one consumer; a ReLU output read by a conv and a residual Add (a ResNet
    stem) stayed a float DequantizeLinear -> QuantizeLinear round trip between two int8 layers.
    Each consumer gets a DequantizeLinear of its own (ONNX Runtime fuses a DQ into one node).

    Example:
        >>> drop_requantized_relus(onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], [])))
        0
    """
    graph = model.graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    producers, consumers = _links(graph)
    outputs = {o.name for o in graph.output}

    def params(n: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
        if len(n.input) < 3 or n.input[1] not in inits or n.input[2] not in inits:
            return None
        return inits[n.input[1]], inits[n.input[2]]

    def same(a: tuple[np.ndarray, np.ndarray] | None, b: tuple[np.ndarray, np.ndarray] | None) -> bool:
        return a is not None and b is not None and a[0].size == 1 and np.array_equal(a[0], b[0]) \
            and np.array_equal(a[1], b[1]) and a[1].dtype == np.uint8 and int(a[1]) == 0

    def no_op(act: onnx.NodeProto, grid: tuple[np.ndarray, np.ndarray] | None) -> bool:
        """A Relu, or a Clip from at most zero to at least the grid's top: nothing to do there."""
        if act.op_type == "Relu":
            return True
        if act.op_type != "Clip" or grid is None:
            return False
        attrs = {a.name: a.f for a in act.attribute}  # opset < 11 keeps the bounds as attributes
        lo = inits[act.input[1]] if len(act.input) > 1 and act.input[1] in inits else attrs.get("min", -np.inf)
        hi = inits[act.input[2]] if len(act.input) > 2 and act.input[2] in inits else attrs.get("max", np.inf)
        if (len(act.input) > 1 and act.input[1] and act.input[1] not in inits) or \
                (len(act.input) > 2 and act.input[2] and act.input[2] not in inits):
            return False  # bounds computed at run time
        top = float(grid[0]) * (255 - int(grid[1]))
        return float(lo) <= 0.0 and float(hi) >= top * (1 - 1e-6)

    dropped: set[int] = set()
    before: dict[int, list[onnx.NodeProto]] = {}  # new DQs, each placed right before its consumer
    made = 0
    for relu in graph.node:
        dq = producers.get(relu.input[0]) if relu.op_type in ("Relu", "Clip") and relu.input else None
        qs = consumers.get(relu.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(qs) != 1 or qs[0].op_type != "QuantizeLinear" \
                or relu.output[0] in outputs or not same(params(dq), params(qs[0])) or not no_op(relu, params(dq)):
            continue
        q = qs[0]
        dqs = consumers.get(q.output[0], [])
        if not dqs or q.output[0] in outputs or not all(d.op_type == "DequantizeLinear" and same(params(d), params(q))
                                                         and d.output[0] not in outputs for d in dqs):
            continue
        dropped.update(id(n) for n in (relu, q, *dqs))
        if all(id(c) in dropped for c in consumers.get(dq.output[0], [])):
            dropped.add(id(dq))
        for d in dqs:
            for user in consumers.get(d.output[0], []):
                name, made = f"{d.name or d.output[0]}.shared.{made}", made + 1
                before.setdefault(id(user), []).append(onnx.helper.make_node(
                    "DequantizeLinear", list(dq.input), [name], name=name))
                for k, t in enumerate(user.input):
                    if t == d.output[0]:
                        user.input[k] = name
    if not dropped:
        return 0
    kept = [m for n in graph.node if id(n) not in dropped for m in (*before.get(id(n), []), n)]
    del graph.node[:]
    graph.node.extend(kept)
    used = {t for n in graph.node for t in n.input}
    unused = [i for i in graph.initializer if i.name not in used]  # the dropped pair's scale and zero point
    for init in unused:
        graph.initializer.remove(init)
    return len(dropped)

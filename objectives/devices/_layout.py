"""Which float kernels ONNX Runtime runs in its blocked NCHWc layout on a device: probed there by
letting ONNX Runtime optimize small test graphs and reading what it made of them (the way
nn-Meter detects fusion rules), not assumed from the CPU family.

Kernels inside one blocked chain hand tensors over without layout reorders; a lone micro-model
pays a reorder in and out. Which edges of a network are such hand-overs decides its boundary
classes (see ``kernel_domain``), so the rules are part of a device's profile."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Layout", "layout_of", "optimized_graph", "probe_layout"]

# channel counts the probe tries; the rules' divisors are read off them
_PROBE_CHANNELS = tuple(range(1, 41)) + (48, 64)
_DIVISORS = (1, 2, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The blocked-layout rules of a device's ONNX Runtime.

    ``block``: the NCHWc channel block (1: no blocked layout at all). A float conv (one group)
    with ``cin`` input channels runs blocked when ``cin < block`` (it reads the plain layout
    directly, like a network's first layer) or ``cin % conv_multiple == 0``; it reads a blocked
    input only in the second case. A depthwise conv runs blocked when ``c % dw_multiple == 0``,
    a max pool when ``c % pool_multiple == 0``. ``source`` says whether the rules were probed
    on the device or assumed from its ISA flags.

    Example:
        >>> lay = Layout(16, conv_multiple=4, dw_multiple=1, pool_multiple=16)
        >>> lay.conv_blocked(12), lay.conv_reads_blocked(12), lay.conv_blocked(17), lay.pool_blocked(24)
        (True, False, False, False)
    """

    block: int = 1
    conv_multiple: int = 1
    dw_multiple: int = 1
    pool_multiple: int = 1
    source: str = "probed"

    @classmethod
    def assumed(cls, block: int, source: str = "from the ISA flags (not probed)") -> Layout:
        """ONNX Runtime 1.32's x86 rules for a given block (what the probe finds there)."""
        return cls(block, 4, 4, max(block, 1), source)

    def conv_blocked(self, cin: int) -> bool:
        """Whether a one-group float conv with ``cin`` input channels runs in the blocked layout."""
        return self.block > 1 and (cin < self.block or cin % self.conv_multiple == 0)

    def conv_reads_blocked(self, cin: int) -> bool:
        """Whether that conv takes a blocked input (else it reads the plain layout)."""
        return self.block > 1 and cin >= self.block and cin % self.conv_multiple == 0

    def dw_blocked(self, c: int) -> bool:
        """Whether a float depthwise conv over ``c`` channels runs blocked."""
        return self.block > 1 and c % self.dw_multiple == 0

    def pool_blocked(self, c: int) -> bool:
        """Whether a max pool over ``c`` channels runs blocked."""
        return self.block > 1 and c % self.pool_multiple == 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``from_dict`` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layout:
        """Inverse of ``to_dict``; raises ValueError naming a bad field."""
        values = {}
        for f in ("block", "conv_multiple", "dw_multiple", "pool_multiple"):
            v = d.get(f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"layout.{f} must be a positive integer, got {v!r}")
            values[f] = v
        return cls(**values, source=str(d.get("source", "probed")))


def layout_of(facts: Mapping[str, Any]) -> Layout:
    """A device's layout rules from its recorded ``facts``: the probed ones where calibration
    stored them, else assumed from the NCHWc block (probed, or read off the ISA flags).

    Example:
        >>> layout_of({"isa_flags": ["avx2"]}).block, layout_of({"isa_flags": ["avx2"]}).source
        (8, 'from the ISA flags (not probed)')
    """
    if isinstance(facts.get("layout"), Mapping):
        return Layout.from_dict(facts["layout"])
    from edgeslim.objectives.devices._profile import nchwc_block_of

    block, source = nchwc_block_of(facts)
    return Layout.assumed(block, source if source != "probed" else "block probed, rules assumed")


_PROBED: list[Layout] = []  # probed once per process


def probe_layout() -> Layout:
    """This machine's layout rules, found by ONNX Runtime itself: for each channel count of
    ``_PROBE_CHANNELS`` a conv, a depthwise conv and a max pool between two blocked convs are
    optimized, and which of them came out as blocked (``com.microsoft.nchwc``) nodes, and
    where reorders were put, gives the divisors (the smallest that explains every probe).

    Example:
        >>> probe_layout().block in (1, 4, 8, 16)
        True
    """
    if _PROBED:
        return _PROBED[0]
    from edgeslim.objectives.devices._profile import probe_nchwc_block

    block = probe_nchwc_block()
    if block <= 1:
        _PROBED.append(Layout(1))
        return _PROBED[0]
    conv, reads, dw, pool = {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="edgeslim-layout-") as tmp:
        for c in _PROBE_CHANNELS:
            nodes = _optimized(_between(c, "conv"), Path(tmp))
            i = _middle(nodes)
            conv[c] = nodes[i][1] == _NCHWC
            # a blocked input: no reorder back to the plain layout right before it
            reads[c] = conv[c] and nodes[i - 1][0] != "ReorderOutput"
            if c > 1:  # a depthwise conv over one channel is a plain conv
                nodes = _optimized(_between(c, "dw"), Path(tmp))
                dw[c] = nodes[_middle(nodes)][1] == _NCHWC
            nodes = _optimized(_between(c, "pool"), Path(tmp))
            pool[c] = nodes[_middle(nodes)][1] == _NCHWC
    big = [c for c in _PROBE_CHANNELS if c >= block]
    lay = Layout(block, _divisor({c: conv[c] for c in big}), _divisor(dw), _divisor(pool))
    explained = ([lay.conv_blocked(c) == conv[c] and lay.conv_reads_blocked(c) == reads[c] for c in conv]
                 + [lay.dw_blocked(c) == dw[c] for c in dw] + [lay.pool_blocked(c) == pool[c] for c in pool])
    if not all(explained):  # an ONNX Runtime whose rules take another form: say so in the profile
        lay = dataclasses.replace(lay, source=f"probed; the rules explain {sum(explained)} of {len(explained)} probes")
    _PROBED.append(lay)
    return lay


_NCHWC = "com.microsoft.nchwc"


def _middle(nodes: list[tuple[str, str, str]]) -> int:
    """Index of the probed node: ONNX Runtime names a blocked node after its output (``m``)."""
    return next(i for i, n in enumerate(nodes) if n[2] == "mid" or n[2].startswith("m_nchwc"))


def _divisor(seen: Mapping[int, bool]) -> int:
    """The smallest divisor d with ``seen[c] == (c % d == 0)`` for the most channel counts."""
    return max(_DIVISORS, key=lambda d: (sum(seen[c] == (c % d == 0) for c in seen), -d))


def _between(c: int, what: str) -> Any:
    """A graph: conv 16 -> c channels, then ``what`` over c channels (named ``mid``), then conv c -> 16."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(c)

    def weights(name: str, cout: int, cin: int) -> list[Any]:
        return [numpy_helper.from_array((rng.random((cout, cin, 3, 3)) * 0.1).astype(np.float32), name),
                numpy_helper.from_array(np.zeros(cout, np.float32), name + "_b")]

    inits = weights("w1", c, 16) + weights("w2", 16, c)
    nodes = [helper.make_node("Conv", ["x", "w1", "w1_b"], ["a"], pads=[1] * 4, name="first"),
             helper.make_node("Relu", ["a"], ["r"], name="relu")]
    size = 8
    if what == "conv":
        inits += weights("wm", c, c)
        nodes.append(helper.make_node("Conv", ["r", "wm", "wm_b"], ["m"], pads=[1] * 4, name="mid"))
    elif what == "dw":
        inits += [numpy_helper.from_array((rng.random((c, 1, 3, 3)) * 0.1).astype(np.float32), "wd"),
                  numpy_helper.from_array(np.zeros(c, np.float32), "wd_b")]
        nodes.append(helper.make_node("Conv", ["r", "wd", "wd_b"], ["m"], pads=[1] * 4, group=c, name="mid"))
    else:
        nodes.append(helper.make_node("MaxPool", ["r"], ["m"], kernel_shape=[2, 2], strides=[2, 2], name="mid"))
        size = 4
    nodes.append(helper.make_node("Conv", ["m", "w2", "w2_b"], ["out"], pads=[1] * 4, name="last"))
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 16, size, size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def optimized_graph(model: Any, tmp: Path) -> Any:
    """The graph ONNX Runtime's CPU provider makes of ``model`` on this machine (written via
    ``SessionOptions.optimized_model_filepath`` into the folder ``tmp``)."""
    import onnx
    import onnxruntime as ort

    src, dst = tmp / "probe.onnx", tmp / "probe.opt.onnx"
    onnx.save(model, str(src))
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(dst)).graph


def _optimized(model: Any, tmp: Path) -> list[tuple[str, str, str]]:
    """(op type, domain, name) of each node of :func:`optimized_graph`."""
    return [(n.op_type, n.domain, n.name) for n in optimized_graph(model, tmp).node]

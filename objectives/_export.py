"""ONNX export of a candidate, ONNX Runtime static quantization, and latency measurement."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeslim.objectives._accuracy import logits_of
from edgeslim.objectives._machine import timing_slot
from edgeslim.objectives._graph_fixes import drop_requantized_relus, keep_pools_float
from edgeslim.spaces import ObjectiveError, dequantized_copy, weight_qmax

__all__ = ["LatencyStats", "RUNTIME_KERNELS", "export_onnx", "measure_latency", "quantize_onnx", "build_artifact",
           "candidate_artifact"]

CALIBRATION_SAMPLES = 32  # training inputs ONNX Runtime's static quantization calibrates on

log = logging.getLogger("edgeslim")


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: Path) -> Path:
    """Export ``model`` (fake quantization stripped) to one ONNX file with the dynamo exporter; a
    model returning a tuple or dict is exported with its logits as the one output (the tensor, the
    tuple's first element, the dict's ``logits`` or else its first tensor).

    Example:
        >>> p = export_onnx(nn.Linear(4, 2), torch.zeros(1, 4), tmp / "m.onnx")  # doctest: +SKIP
    """
    plain: nn.Module = dequantized_copy(model).eval()
    with torch.no_grad():
        structured = not isinstance(plain(example_input), torch.Tensor)
    if structured:  # a tuple or dict: the artifact's one output is what scoring took as the logits
        plain = _LogitsOnly(plain)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # the exporter prints progress lines on stdout even with verbose=False, and its onnx_ir
        # passes log at INFO through the root logger once ONNX Runtime's tooling configured it
        with _quiet():
            torch.onnx.export(plain, (example_input,), str(path), dynamo=True,
                              external_data=False, verbose=False,
                              input_names=["input"], output_names=["output"])
    except Exception as e:
        raise ObjectiveError(f"ONNX export failed for {type(model).__name__}: {e}") from e
    return path


class _LogitsOnly(nn.Module):
    """A model whose output is a tuple or dict, reduced to its logits (:func:`logits_of`'s rule)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(x))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence ONNX Runtime's quantization tooling, which logs through the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _fingerprint(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=np.float32).tobytes()).hexdigest() + str(arr.shape)


def _weight_of_node(node: onnx.NodeProto, producers: Mapping[str, onnx.NodeProto],
                    arrays: Mapping[str, onnx.TensorProto],
                    by_content: Mapping[str, str]) -> tuple[str, str, int] | None:
    """(initializer name, layer FQN, axis of the output channels in the stored initializer) of the
    weight a Conv/Gemm/MatMul node multiplies with.

    The exporter names a weight after its layer (``fc.weight``), except where it folds a
    transpose into a new constant (``val_12``, 3-D inputs of nn.Linear): those are found by
    their content, which is the layer's weight transposed bit for bit. Conv and Gemm(transB=1)
    weights are [out, in], MatMul and Gemm(transB=0) ones [in, out]; a Transpose in between flips it.
    """
    if len(node.input) < 2:
        return None
    name = node.input[1]
    via_transpose = name not in arrays and name in producers and producers[name].op_type == "Transpose"
    if via_transpose:
        name = producers[name].input[0]
    if name not in arrays:
        return None
    layout = _gemm_as_matmul(node) if node.op_type in ("Gemm", "MatMul") else (True, False)
    axis = 0 if layout is None or layout[0] else 1
    axis = 1 - axis if via_transpose and node.op_type != "Conv" else axis
    if name.endswith(".weight"):
        return name, name[: -len(".weight")], axis
    fqn = by_content.get(_fingerprint(onnx.numpy_helper.to_array(arrays[name])))
    return (name, fqn, axis) if fqn else None


def activation_overrides(model: nn.Module) -> dict[str, tuple[float, int, float, int]]:
    """Input and output (scale, zero point) of every observed int8 layer, by layer FQN.

    Example:
        >>> activation_overrides(nn.Linear(2, 2))
        {}
    """
    from edgeslim.spaces import QuantizedLayer

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLayer) and m.quantize_input and m.has_qparams():
            out[name] = (*m.act_qparams(), *m.out_qparams())
    return out


RUNTIME_KERNELS = {
    "fp32": "fp32",
    "int8": "int8 QDQ, fused by ONNX Runtime into QLinearConv / QGemm",
    "int4-matmulnbits": "int4 MatMulNBits (weights block 32, input quantized to int8 on the fly)",
    "int4-qdq": "int4 weights dequantized to fp32 at run time (ONNX Runtime's CPU provider has no int4 Conv kernel)",
}


def quantize_onnx(fp32_path: Path, out_path: Path, bits_by_layer: Mapping[str, int],
                  calibration: Sequence[np.ndarray],
                  act_overrides: Mapping[str, tuple[float, int, float, int]] | None = None,
                  reduce_range: bool = False, layer_weights: Mapping[str, np.ndarray] | None = None,
                  ) -> tuple[Path, dict[str, int], dict[str, str]]:
    """Quantize the layers whose bits are 8 or fewer with ONNX Runtime's tooling.

    BatchNorm is folded first (``quant_pre_process``); without it int8 runs slower than fp32.
    Conv/Gemm at 8 (or 4) bits: static QDQ with per-channel symmetric weights and per-tensor
    uint8 activations calibrated by MinMax on ``calibration``, except where ``act_overrides``
    gives the scales the fake-quantized torch model used (then ONNX Runtime computes the same
    numbers). Linear at 4 bits: ONNX Runtime's MatMulNBits (weight-only, block-wise), the one
    4-bit kernel its CPU provider has. Returns the path, the bits each layer really got in the
    artifact (32 where no node of the graph could be matched to the layer) and the kernel each
    layer runs as (a key of ``RUNTIME_KERNELS``). ``layer_weights`` (FQN -> weight as exported)
    lets layers whose weight the exporter renamed be found by content.
    """
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    with _quiet():
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    graph = onnx.load(str(pre)).graph
    arrays = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    by_content = {}
    for fqn, arr in (layer_weights or {}).items():
        if bits_by_layer.get(fqn, 32) <= 8:
            by_content[_fingerprint(arr)] = fqn
            if arr.ndim == 2:
                by_content[_fingerprint(arr.T)] = fqn
    wanted = {fqn: bits for fqn, bits in bits_by_layer.items() if bits <= 8}
    nodes, overrides, got = [], {}, {fqn: 32 for fqn in bits_by_layer}
    how = {fqn: "fp32" for fqn in bits_by_layer}
    nbits: dict[str, tuple[str, int]] = {}  # node name -> (weight initializer, output axis), for MatMulNBits
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        found = _weight_of_node(node, producers, arrays, by_content)
        if found is None or found[1] not in wanted or got[found[1]] != 32:
            continue
        w, fqn, axis = found
        if wanted[fqn] == 4 and node.op_type in ("Gemm", "MatMul"):
            if _gemm_as_matmul(node) is not None:
                nbits[node.name] = (w, axis)
                got[fqn], how[fqn] = 4, "int4-matmulnbits"
            continue  # a Gemm with alpha/beta we cannot rewrite stays fp32 (recorded as such)
        nodes.append(node.name)
        got[fqn] = wanted[fqn]
        how[fqn] = "int8" if wanted[fqn] == 8 else "int4-qdq"
        # explicit per-channel scales: the very grid the fake-quantized weights sit on
        # (ONNX Runtime's own int4 rule, amax/7.5, would re-round them)
        weights = onnx.numpy_helper.to_array(arrays[w])
        amax = np.abs(np.moveaxis(weights, axis, 0).reshape(weights.shape[axis], -1)).max(axis=1)
        scales = np.maximum(amax / weight_qmax(wanted[fqn], reduce_range and wanted[fqn] == 8), 1e-12)
        qtype = QuantType.QInt4 if wanted[fqn] == 4 else QuantType.QInt8
        overrides[w] = [{"axis": axis, "quant_type": qtype, "scale": np.array(scales[0], dtype=np.float32),
                         "zero_point": np.array(0, dtype=np.int8)}]
        overrides[w] += [{"scale": np.array(v, dtype=np.float32), "zero_point": np.array(0, dtype=np.int8)}
                         for v in scales[1:]]
        if act_overrides and fqn in act_overrides:
            s_in, z_in, s_out, z_out = act_overrides[fqn]
            overrides.setdefault(node.output[0], [{"scale": np.array(s_out, dtype=np.float32), "zero_point": np.array(z_out, dtype=np.uint8)}])
            # a tensor both produced and consumed by int8 layers takes the consumer's scale
            overrides[node.input[0]] = [{"scale": np.array(s_in, dtype=np.float32), "zero_point": np.array(z_in, dtype=np.uint8)}]
    staged = out_path.with_name(out_path.stem + ".qdq-stage.onnx") if nbits else out_path
    if nodes:
        class Reader(CalibrationDataReader):
            def __init__(self, batches: Iterable[np.ndarray]) -> None:
                self._it = iter([{graph.input[0].name: b} for b in batches])

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self._it, None)

        with _quiet():
            quantize_static(
                str(pre), str(staged), Reader(calibration), quant_format=QuantFormat.QDQ,
                per_channel=True, reduce_range=reduce_range,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                               "TensorQuantOverrides": overrides,
                               # int4 weights need opset 21 Q/DQ or the com.microsoft ones
                               "UseQDQContribOps": any(v == "int4-qdq" for v in how.values())},
            )
        pre.unlink(missing_ok=True)
    else:
        pre.replace(staged)
    if nodes:
        _fix_qdq_graph(staged)
    if nbits:
        _to_matmul_nbits(staged, out_path, nbits)
        staged.unlink(missing_ok=True)
    return out_path, got, how


def _fix_qdq_graph(path: Path) -> int:
    """:func:`keep_pools_float` and :func:`drop_requantized_relus` on an ONNX file (rewritten in
    place when anything changed)."""
    model = onnx.load(str(path))
    changed = keep_pools_float(model) + drop_requantized_relus(model)
    if changed:
        onnx.save(model, str(path))
    return changed


def _gemm_as_matmul(node: onnx.NodeProto) -> tuple[bool, bool] | None:
    """(transposed weight, has bias) of a Gemm/MatMul that is ``x @ W(.T) + b``; None otherwise."""
    if node.op_type == "MatMul":
        return False, False
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
        return None
    return bool(attrs.get("transB", 0)), len(node.input) > 2 and bool(node.input[2])


def _to_matmul_nbits(src: Path, dst: Path, nbits: Mapping[str, tuple[str, int]]) -> None:
    """Rewrite the named Gemm/MatMul nodes to ``MatMul(x, W[K, N]) (+ bias)`` and hand them to
    ONNX Runtime's MatMulNBits quantizer (4 bits, block 32, symmetric: the rule the torch side
    fake-quantizes with, so the grid-snapped weights are stored exactly)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from edgeslim.spaces import NBITS_BLOCK

    model = onnx.load(str(src))
    graph = model.graph
    arrays = {i.name: i for i in graph.initializer}
    new_nodes, targets = [], []
    for node in graph.node:
        if node.name not in nbits:
            new_nodes.append(node)
            continue
        _, has_bias = _gemm_as_matmul(node) or (False, False)
        init, out_axis = nbits[node.name]
        w = onnx.numpy_helper.to_array(arrays[init])
        kn = np.ascontiguousarray(w.T if out_axis == 0 else w, dtype=np.float32)
        w_name = f"{init}.kn"
        graph.initializer.append(onnx.numpy_helper.from_array(kn, w_name))
        mm_out = f"{node.output[0]}.mm" if has_bias else node.output[0]
        mm_name = f"{node.name}.nbits"
        new_nodes.append(onnx.helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=mm_name))
        if has_bias:
            new_nodes.append(onnx.helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]],
                                                   name=f"{node.name}.bias"))
        targets.append(mm_name)
    outputs = {o.name for o in graph.output}
    while True:  # drop what fed only the replaced nodes (a weight Transpose, the old weight)
        used = {i for n in new_nodes for i in n.input} | outputs
        live = [n for n in new_nodes if any(o in used for o in n.output)]
        if len(live) == len(new_nodes):
            break
        new_nodes = live
    del graph.node[:]
    graph.node.extend(new_nodes)
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    with _quiet():
        # accuracy_level 4: int8 compute, 1.5x faster than fp32 Gemm here where fp32 compute is 3x slower
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=NBITS_BLOCK, is_symmetric=True,
                                         accuracy_level=4, nodes_to_include=targets)
        quantizer.process()
    onnx.save(quantizer.model.model, str(dst))


PAIRS = 3  # fresh session pairs a paired measurement pools


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Batch-1 latency of one ONNX file under one protocol, in milliseconds.

    Example:
        >>> LatencyStats(p50_ms=1.0, p95_ms=1.2, mean_ms=1.05, runs=100, threads=1).p95_ms
        1.2
    """

    p50_ms: float
    p95_ms: float
    mean_ms: float
    runs: int
    threads: int
    # paired with a reference model (the dense baseline) in the same windows, when one was given
    reference_p50_ms: float | None = None
    speedup: float | None = None  # reference p50 / this p50
    speedup_spread: tuple[float, float] | None = None  # lowest and highest ratio over the pairs


def measure_latency(path: Path, input_shape: Sequence[int], threads: int = 1, warmup: int = 20,
                    min_runs: int = 50, max_runs: int = 2000, budget_s: float = 1.0,
                    seed: int = 0, sessions: int = 1, reference: Path | None = None,
                    example: np.ndarray | None = None) -> LatencyStats:
    """Median and p95 latency of ``path`` with ONNX Runtime's CPU provider.

    Fixed intra-op threads, sequential execution, all graph optimizations, random (non-zero)
    input, ``warmup`` discarded runs, then runs until ``budget_s`` is spent (bounded by
    ``min_runs``/``max_runs``), in the calibration's windows
    (:func:`edgeslim.objectives.devices._runner.time_group`). Each run is timed on its own. With
    ``sessions`` > 1 that many fresh sessions are timed (taking turns with 1 thread, one after
    another with more: :func:`edgeslim.objectives.devices._runner.measure_files`) and pooled
    (:func:`edgeslim.objectives.devices._runner.pool_sessions`: median of their medians, p95 over all runs).

    With a ``reference`` file (the dense baseline's artifact) the two are timed as a pair, in
    the same interleaved windows, in ``max(sessions, PAIRS)`` fresh pairs sharing ``budget_s``
    each: ``speedup`` is the ratio of the pooled medians and ``speedup_spread`` the range of
    the per-pair ratios. A VM's speed state moves both sides of a pair alike, so a pruned
    variant no longer measures slower than dense because it was timed in a slow minute. With
    more than one thread the two files of a pair are timed one after the other instead of
    interleaved (an idle session's thread pool slows the running one, see ``measure_files``).

    Example:
        >>> s = measure_latency(Path("variant.onnx"), (1, 3, 32, 32), reference=Path("dense.onnx"))  # doctest: +SKIP
        >>> s.speedup, s.speedup_spread  # doctest: +SKIP
        (1.41, (1.37, 1.46))
    """
    from edgeslim.objectives.devices._runner import PROTOCOL, make_session

    if example is not None and not np.issubdtype(example.dtype, np.floating):
        x = example  # token ids and other integer inputs: a real sample, random ones may be out of range
    else:
        x = np.random.default_rng(seed).standard_normal(tuple(input_shape)).astype(np.float32)
    protocol = {"warmup": warmup, "min_runs": min_runs, "max_runs": max_runs, "budget_s": budget_s,
                "spike_factor": math.inf, "rounds": PROTOCOL["rounds"]}

    def open_session(file: str, n_threads: int) -> Any:
        try:  # the same session settings as calibration, so measured and predicted agree on protocol
            return make_session(file, n_threads)
        except Exception as e:
            raise ObjectiveError(f"ONNX Runtime cannot load {path}: {e}") from e

    def feed(session: Any, _: int) -> dict[str, np.ndarray]:
        return {session.get_inputs()[0].name: x}

    with timing_slot():  # one timing at a time on this machine; other workers' fine-tune steps wait
        return _measure_latency(path, threads, sessions, reference, protocol, min_runs, budget_s, open_session, feed)


def _measure_latency(path: Path, threads: int, sessions: int, reference: Path | None, protocol: dict[str, float],
                     min_runs: int, budget_s: float, open_session: Any, feed: Any) -> LatencyStats:
    from edgeslim.objectives.devices._runner import measure_files, pool_sessions

    if reference is None:
        n = max(sessions, 1)
        got = measure_files([str(path)] * n, threads, list(range(n)), protocol, keep_times=True,
                            open_session=open_session, feed=feed)
        pooled = pool_sessions(got)
        return LatencyStats(pooled["p50_ms"], pooled["p95_ms"], pooled["mean_ms"], pooled["runs"], threads)
    n = max(sessions, PAIRS)
    per_pair = {**protocol, "budget_s": budget_s / n, "min_runs": max(min_runs // n, 10)}
    mine, theirs = [], []
    for k in range(n):
        a, b = measure_files([str(path), str(reference)], threads, [k, k], per_pair, keep_times=True,
                             open_session=open_session, feed=feed)
        mine.append(a)
        theirs.append(b)
    ratios = [b["p50_ms"] / a["p50_ms"] for a, b in zip(mine, theirs)]
    pooled, ref = pool_sessions(mine), pool_sessions(theirs)
    return LatencyStats(pooled["p50_ms"], pooled["p95_ms"], pooled["mean_ms"], pooled["runs"], threads,
                        reference_p50_ms=ref["p50_ms"], speedup=ref["p50_ms"] / pooled["p50_ms"],
                        speedup_spread=(min(ratios), max(ratios)))


def build_artifact(model: nn.Module, example_input: torch.Tensor, bits_by_layer: Mapping[str, int],
                   calibration: Sequence[np.ndarray], workdir: Path, stem: str = "candidate",
                   match_torch: bool = True) -> tuple[Path, dict[str, int], dict[str, str]]:
    """Export ``model`` and quantize its low-bit layers: the ONNX file that would ship.

    With ``match_torch`` the activation scales of the fake-quantized model are handed to ONNX
    Runtime. Returns the artifact path, the bits each layer runs at in it and the kernel each
    layer runs as (keys of ``RUNTIME_KERNELS``).
    """
    fp32 = export_onnx(model, example_input, workdir / f"{stem}.fp32.onnx")
    if not any(b <= 8 for b in bits_by_layer.values()):
        return fp32, dict(bits_by_layer), {fqn: "fp32" for fqn in bits_by_layer}
    try:
        from edgeslim.spaces import QuantizedLayer

        reduce = any(m.reduce_range for m in model.modules() if isinstance(m, QuantizedLayer) and m.bits == 8)
        plain = dequantized_copy(model)
        weights = {n: m.weight.detach().numpy() for n, m in plain.named_modules()
                   if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}
        return quantize_onnx(fp32, workdir / f"{stem}.qdq.onnx", bits_by_layer, calibration,
                             activation_overrides(model) if match_torch else None, reduce, weights)
    except Exception as e:
        raise ObjectiveError(f"ONNX Runtime quantization failed: {e}") from e


def _as_input(t: torch.Tensor) -> np.ndarray:
    """A sample as ONNX Runtime takes it: floats as float32, integers (token ids) as they are."""
    return t.numpy().astype(np.float32) if t.is_floating_point() else t.numpy()


def candidate_artifact(candidate: Any, ctx: Any) -> tuple[Path, dict[str, int], dict[str, str]]:
    """The candidate's artifact (see :func:`build_artifact`), built once and kept on the candidate
    so that the accuracy and latency objectives score the same file.

    Example:
        >>> path, bits, kernels = candidate_artifact(candidate, ctx)  # doctest: +SKIP
    """
    if candidate.artifact is None:
        from edgeslim.objectives._data import sample_inputs
        from edgeslim.spaces import layer_bits

        calib = [_as_input(t) for t in sample_inputs(ctx.data.train, CALIBRATION_SAMPLES, ctx.seed)]
        candidate.artifact = build_artifact(candidate.model, ctx.example_input, layer_bits(candidate.model),
                                            calib, ctx.workdir)
    return candidate.artifact

"""ONNX export of a candidate, ONNX Runtime static quantization, and latency measurement."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeslim.spaces import ObjectiveError, dequantized_copy, weight_qmax

__all__ = ["LatencyStats", "export_onnx", "measure_latency", "quantize_onnx", "build_artifact"]

log = logging.getLogger("edgeslim")


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: Path) -> Path:
    """Export ``model`` (fake quantization stripped) to one ONNX file with the dynamo exporter.

    Example:
        >>> p = export_onnx(nn.Linear(4, 2), torch.zeros(1, 4), tmp / "m.onnx")  # doctest: +SKIP
    """
    plain = dequantized_copy(model).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    sink = io.StringIO()
    try:
        # the exporter prints progress lines on stdout even with verbose=False
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(plain, (example_input,), str(path), dynamo=True,
                              external_data=False, verbose=False,
                              input_names=["input"], output_names=["output"])
    except Exception as e:
        raise ObjectiveError(f"ONNX export failed for {type(model).__name__}: {e}") from e
    return path


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


def _weight_of_node(node: onnx.NodeProto, producers: Mapping[str, onnx.NodeProto],
                    initializers: set[str]) -> str | None:
    if len(node.input) < 2:
        return None
    name = node.input[1]
    if name not in initializers and name in producers and producers[name].op_type == "Transpose":
        name = producers[name].input[0]
    return name if name in initializers else None


def activation_overrides(model: nn.Module) -> dict[str, tuple[float, int, float, int]]:
    """Input and output (scale, zero point) of every observed int8 layer, by layer FQN.

    Example:
        >>> activation_overrides(nn.Linear(2, 2))
        {}
    """
    from edgeslim.spaces import QuantizedLayer

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLayer) and m.quantize_input and bool(m.observed) and bool(m.out_observed):
            out[name] = (*m.act_qparams(), *m.out_qparams())
    return out


def quantize_onnx(fp32_path: Path, out_path: Path, bits_by_layer: Mapping[str, int],
                  calibration: Sequence[np.ndarray],
                  act_overrides: Mapping[str, tuple[float, int, float, int]] | None = None,
                  reduce_range: bool = False) -> tuple[Path, dict[str, int]]:
    """Static QDQ quantization with ONNX Runtime of the layers whose bits are 8 or fewer.

    BatchNorm is folded first (``quant_pre_process``); without it int8 runs slower than fp32.
    Weights are per-channel symmetric int8 (int4 where the plan says 4), activations per-tensor
    uint8 calibrated by MinMax on ``calibration``, except where ``act_overrides`` gives the
    scales the fake-quantized torch model used (then ONNX Runtime computes the same numbers).
    Returns the path and the bits each layer really got in the artifact (32 where no node of
    the graph could be matched to the layer).
    """
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    with _quiet():
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    graph = onnx.load(str(pre)).graph
    arrays = {i.name: i for i in graph.initializer}
    inits = set(arrays)
    producers = {o: n for n in graph.node for o in n.output}
    wanted = {f"{fqn}.weight": bits for fqn, bits in bits_by_layer.items() if bits <= 8}
    nodes, overrides, got = [], {}, {fqn: 32 for fqn in bits_by_layer}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        w = _weight_of_node(node, producers, inits)
        if w in wanted:
            nodes.append(node.name)
            fqn = w[: -len(".weight")]
            got[fqn] = wanted[w]
            # explicit per-channel scales: the very grid the fake-quantized weights sit on
            # (ONNX Runtime's own int4 rule, amax/7.5, would re-round them)
            weights = onnx.numpy_helper.to_array(arrays[w])
            axis = 1 if node.op_type == "MatMul" else 0
            amax = np.abs(np.moveaxis(weights, axis, 0).reshape(weights.shape[axis], -1)).max(axis=1)
            scales = np.maximum(amax / weight_qmax(wanted[w], reduce_range and wanted[w] == 8), 1e-12)
            qtype = QuantType.QInt4 if wanted[w] == 4 else QuantType.QInt8
            overrides[w] = [{"axis": axis, "quant_type": qtype, "scale": np.array(scales[0], dtype=np.float32),
                             "zero_point": np.array(0, dtype=np.int8)}]
            overrides[w] += [{"scale": np.array(v, dtype=np.float32), "zero_point": np.array(0, dtype=np.int8)}
                             for v in scales[1:]]
            if act_overrides and fqn in act_overrides:
                s_in, z_in, s_out, z_out = act_overrides[fqn]
                overrides.setdefault(node.output[0], [{"scale": np.array(s_out, dtype=np.float32), "zero_point": np.array(z_out, dtype=np.uint8)}])
                # a tensor both produced and consumed by int8 layers takes the consumer's scale
                overrides[node.input[0]] = [{"scale": np.array(s_in, dtype=np.float32), "zero_point": np.array(z_in, dtype=np.uint8)}]
    if not nodes:
        pre.replace(out_path)
        return out_path, got

    class Reader(CalibrationDataReader):
        def __init__(self, batches: Iterable[np.ndarray]) -> None:
            self._it = iter([{graph.input[0].name: b} for b in batches])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    with _quiet():
        quantize_static(
            str(pre), str(out_path), Reader(calibration), quant_format=QuantFormat.QDQ,
            per_channel=True, reduce_range=reduce_range,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                           "TensorQuantOverrides": overrides,
                           # int4 weights need opset 21 Q/DQ or the com.microsoft ones
                           "UseQDQContribOps": any(b == 4 for b in got.values())},
        )
    pre.unlink(missing_ok=True)
    return out_path, got


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


def measure_latency(path: Path, input_shape: Sequence[int], threads: int = 1, warmup: int = 20,
                    min_runs: int = 50, max_runs: int = 2000, budget_s: float = 1.0,
                    seed: int = 0) -> LatencyStats:
    """Median and p95 latency of ``path`` with ONNX Runtime's CPU provider.

    Fixed intra-op threads, sequential execution, all graph optimizations, random (non-zero)
    input, ``warmup`` discarded runs, then runs until ``budget_s`` is spent (bounded by
    ``min_runs``/``max_runs``). Each run is timed on its own.
    """
    from edgeslim.objectives._runner import make_session

    try:  # the same session settings as calibration, so measured and predicted agree on protocol
        sess = make_session(str(path), threads)
    except Exception as e:
        raise ObjectiveError(f"ONNX Runtime cannot load {path}: {e}") from e
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(seed).standard_normal(tuple(input_shape)).astype(np.float32)
    feed = {name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        times.append((time.perf_counter_ns() - t0) / 1e6)
    arr = np.asarray(times)
    return LatencyStats(float(np.median(arr)), float(np.percentile(arr, 95)), float(arr.mean()),
                        len(times), threads)


def build_artifact(model: nn.Module, example_input: torch.Tensor, bits_by_layer: Mapping[str, int],
                   calibration: Sequence[np.ndarray], workdir: Path, stem: str = "candidate",
                   match_torch: bool = True) -> tuple[Path, dict[str, int]]:
    """Export ``model`` and quantize its low-bit layers: the ONNX file that would ship.

    With ``match_torch`` the activation scales of the fake-quantized model are handed to ONNX
    Runtime. Returns the artifact path and the bits each layer runs at in it.
    """
    fp32 = export_onnx(model, example_input, workdir / f"{stem}.fp32.onnx")
    if not any(b <= 8 for b in bits_by_layer.values()):
        return fp32, dict(bits_by_layer)
    try:
        from edgeslim.spaces import QuantizedLayer

        reduce = any(m.reduce_range for m in model.modules() if isinstance(m, QuantizedLayer) and m.bits == 8)
        return quantize_onnx(fp32, workdir / f"{stem}.qdq.onnx", bits_by_layer, calibration,
                             activation_overrides(model) if match_torch else None, reduce)
    except Exception as e:
        raise ObjectiveError(f"ONNX Runtime quantization failed: {e}") from e

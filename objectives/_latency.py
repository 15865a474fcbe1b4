"""Latency: the candidate's ONNX artifact measured with ONNX Runtime at batch 1."""

from __future__ import annotations

from edgeslim.objectives._base import Candidate, EvalContext, Objective
from edgeslim.objectives._export import candidate_artifact, measure_latency
from edgeslim.spaces import layer_bits

__all__ = ["LatencyObjective"]



class LatencyObjective(Objective):
    """Median batch-1 latency (ms): measured on this machine, or predicted by a calibrated profile.

    With ``local`` the exported, quantized candidate is timed with ONNX Runtime. With a
    calibrated device profile its kernels are read off the realized module and summed by the
    profile's latency model (well under a millisecond per candidate).

    Records ``latency_p95_ms``, ``latency_runs``, ``latency_method``, ``artifact_bytes`` (the
    ONNX file's size), ``runtime_bits`` (the bits each layer really runs at) and
    ``runtime_kernels`` (the kernel each layer runs as, see ``RUNTIME_KERNELS``). With
    ``ctx.reference_artifact`` the candidate is timed paired with the dense baseline (see
    :func:`measure_latency`) and ``latency_speedup_paired``, ``latency_speedup_spread`` and
    ``latency_reference_ms`` are recorded too.

    Example:
        >>> LatencyObjective.direction
        'minimize'
    """

    name = "latency_ms"
    direction = "minimize"
    unit = "ms"

    def evaluate(self, candidate: Candidate, ctx: EvalContext) -> float:
        if ctx.device.predicts_latency:
            return self._predict(candidate, ctx)
        path, runtime_bits, runtime_kernels = candidate_artifact(candidate, ctx)
        stats = measure_latency(path, tuple(ctx.example_input.shape), threads=ctx.device.threads,
                                seed=ctx.seed, reference=ctx.reference_artifact,
                                example=ctx.example_input.numpy())
        if stats.speedup is not None:
            candidate.metrics.update(latency_reference_ms=stats.reference_p50_ms,
                                     latency_speedup_paired=stats.speedup,
                                     latency_speedup_spread=list(stats.speedup_spread))
        candidate.metrics.update(
            latency_p95_ms=stats.p95_ms,
            latency_runs=stats.runs,
            latency_method=f"measured: onnxruntime CPU, {stats.threads} thread(s), batch 1, "
                           f"median of {stats.runs} runs"
                           + (", paired with the dense baseline" if stats.speedup is not None else ""),
            artifact_bytes=path.stat().st_size,
            runtime_bits=runtime_bits,
            runtime_kernels=runtime_kernels,
        )
        return stats.p50_ms

    def _predict(self, candidate: Candidate, ctx: EvalContext) -> float:
        model = ctx.device.latency_model
        assert model is not None
        p50, p95, n_kernels = model.predict_module(candidate.model, ctx.example_input)
        candidate.metrics.update(
            latency_p95_ms=p95,
            latency_method=f"predicted (estimate): kernel model of device profile {ctx.device.name} "
                           f"({ctx.device.profile_id}), {ctx.device.threads} thread(s), {n_kernels} kernels",
            runtime_bits=layer_bits(candidate.model),
        )
        return p50

"""How a candidate is scored: accuracy, size, latency, energy; target devices in ``devices``.

Built-in objectives are found by name in ``OBJECTIVES``; the study's Optuna directions are
read from the objective classes, so they cannot disagree.

Example:
    >>> from edgeslim.objectives import OBJECTIVES
    >>> [(n, OBJECTIVES[n].direction) for n in ("accuracy", "size_bytes")]
    [('accuracy', 'maximize'), ('size_bytes', 'minimize')]
"""

from edgeslim.objectives._accuracy import (AccuracyObjective, evaluate_accuracy, evaluate_onnx_accuracy, finetune_,
                                           finetune_device, logits_of, predictions)
from edgeslim.objectives._base import Candidate, DataSplits, EvalContext, FinetuneConfig, Objective
from edgeslim.objectives._data import batches, is_label_free, sample_inputs, teacher_labelled
from edgeslim.objectives._energy import EnergyBreakdown, EnergyObjective, estimate_energy
from edgeslim.objectives._export import RUNTIME_KERNELS, LatencyStats, build_artifact, export_onnx, measure_latency, quantize_onnx
from edgeslim.objectives._latency import LatencyObjective
from edgeslim.objectives._size import SizeObjective, model_size_bytes
from edgeslim.objectives.devices import (DEVICES_DIR, DeviceProfile, EnergyConstants, Kernel, LatencyModel, ProfileError,
                                         extract_kernels, kernel_type, known_devices, load_device, probe_nchwc_block)

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (AccuracyObjective, SizeObjective, LatencyObjective, EnergyObjective)
}

__all__ = sorted([
    "DEVICES_DIR", "Kernel", "LatencyModel", "ProfileError", "extract_kernels", "kernel_type", "known_devices",
    "load_device", "probe_nchwc_block", "AccuracyObjective", "Candidate", "DataSplits", "DeviceProfile", "EnergyBreakdown",
    "EnergyConstants", "EnergyObjective", "EvalContext", "FinetuneConfig", "LatencyObjective",
    "LatencyStats", "OBJECTIVES", "evaluate_onnx_accuracy", "RUNTIME_KERNELS", "Objective", "SizeObjective", "batches", "build_artifact",
    "estimate_energy", "is_label_free", "teacher_labelled", "evaluate_accuracy", "export_onnx", "finetune_", "finetune_device", "measure_latency",
    "logits_of", "model_size_bytes", "predictions", "quantize_onnx", "sample_inputs",
])

"""Energy: a documented per-layer estimate, labelled as such everywhere."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from edgeslim.objectives._base import Candidate, EvalContext, Objective
from edgeslim.objectives.devices._profile import EnergyConstants
from edgeslim.spaces import dequantized_copy, inventory, layer_bits, runtime_format

__all__ = ["EnergyBreakdown", "EnergyObjective", "estimate_energy"]


@dataclasses.dataclass(frozen=True)
class EnergyBreakdown:
    """Energy of one inference in millijoules, split into its terms.

    Example:
        >>> EnergyBreakdown(compute_mj=0.1, memory_mj=0.2, static_mj=0.3).total_mj
        0.6
    """

    compute_mj: float
    memory_mj: float
    static_mj: float

    @property
    def total_mj(self) -> float:
        """Sum of the three terms."""
        return round(self.compute_mj + self.memory_mj + self.static_mj, 12)


def estimate_energy(model: nn.Module, example_input: torch.Tensor, latency_ms: float,
                    constants: EnergyConstants) -> EnergyBreakdown:
    """Σ over Conv/Linear layers (MACs × pJ/MAC at the layer's bits + bytes moved × pJ/byte)
    + static power × latency.

    Bytes moved per layer: its weights at their bit-width, plus its input and output
    activations (1 byte per element when the layer runs in int8, else 4). A 4-bit Linear runs
    as MatMulNBits: 4-bit weights, int8 MACs, fp32 input and output. Elementwise ops,
    pooling and BatchNorm are left out: they fold into neighbours or are negligible next to
    the convolutions.

    Example:
        >>> e = estimate_energy(nn.Linear(4, 2), torch.zeros(1, 4), 0.0, EnergyConstants())
        >>> round(e.compute_mj * 1e9, 3)  # 8 MACs * 4.6 pJ, in pJ
        36.8
    """
    bits = layer_bits(model)
    compute_pj = memory_pj = 0.0
    for layer in inventory(dequantized_copy(model), example_input):
        b = bits.get(layer.name, 32)
        # a 4-bit Linear (MatMulNBits) reads and writes fp32 activations and computes in int8
        _, compute_bits, act_bytes = runtime_format(layer.kind == "linear", b)
        weight_elems = layer.params
        moved = (math.ceil(weight_elems * b / 8) + act_bytes * (math.prod(layer.in_shape)
                                                                 + math.prod(layer.out_shape)))
        compute_pj += layer.macs * constants.mac_pj(compute_bits)
        memory_pj += moved * constants.byte_pj
    return EnergyBreakdown(compute_pj * 1e-9, memory_pj * 1e-9, constants.static_w * latency_ms)


class EnergyObjective(Objective):
    """Estimated energy per inference (mJ) from the device profile's constants.

    Needs the latency objective's result (static power × latency). Records the breakdown and
    ``energy_method`` (always says "estimate" unless the profile's constants were measured).

    Example:
        >>> EnergyObjective.requires
        ('latency_ms',)
    """

    name = "energy_mj"
    direction = "minimize"
    unit = "mJ"
    requires = ("latency_ms",)
    estimated = True

    def evaluate(self, candidate: Candidate, ctx: EvalContext) -> float:
        constants = ctx.device.energy
        e = estimate_energy(candidate.model, ctx.example_input, candidate.metrics["latency_ms"],
                            constants)
        kind = "fitted to measurements" if constants.measured else "estimate"
        candidate.metrics.update(
            energy_compute_mj=e.compute_mj, energy_memory_mj=e.memory_mj,
            energy_static_mj=e.static_mj,
            energy_method=f"{kind}: per-layer MACs and bytes moved ({constants.source})",
        )
        return e.total_mj

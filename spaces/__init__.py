"""What can change: layer inventory, knobs and rules, Plan, and realizing a plan.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from edgeslim.spaces import CompressionSpace
    >>> m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> space = CompressionSpace.build(m, torch.zeros(1, 16))
    >>> plan = space.uniform_plan(sparsity=0.5, bits=8)
    >>> space.realize(m, plan)(torch.zeros(1, 16)).shape
    torch.Size([1, 4])
"""

from edgeslim.spaces._errors import (EdgeslimError, InfeasiblePlanError, NoFitError, ObjectiveError, ProfileError,
                                     SpaceError, SpecError)
from edgeslim.spaces._inventory import LayerInfo, inventory, layer_macs, macs
from edgeslim.spaces._knobs import SUPPORTED_BITS, BitsKnob, Knob, LayerRule, RankKnob, RuleSet, SparsityKnob
from edgeslim.spaces._lowrank import factorize, rank_for, svd_pair
from edgeslim.spaces._plan import LayerPlan, Plan
from edgeslim.spaces._quant import (NBITS_BLOCK, QuantizedLayer, dequantized_copy, layer_bits, quantize_weight,
                                    quantize_weight_blockwise, runtime_format, weight_qmax, custom_forward)
from edgeslim.spaces._space import CompressionSpace, PruneGroup, link_quantizers_, pruned_count

__all__ = sorted([
    "BitsKnob", "CompressionSpace", "EdgeslimError", "InfeasiblePlanError", "Knob", "LayerInfo",
    "LayerPlan", "LayerRule", "NoFitError", "ObjectiveError", "ProfileError", "Plan", "PruneGroup", "QuantizedLayer", "RankKnob",
    "RuleSet", "SUPPORTED_BITS", "SpaceError", "SparsityKnob", "SpecError", "dequantized_copy",
    "factorize", "inventory", "custom_forward", "layer_bits", "layer_macs", "macs", "link_quantizers_", "quantize_weight", "quantize_weight_blockwise",
    "NBITS_BLOCK", "pruned_count", "runtime_format", "rank_for", "svd_pair", "weight_qmax",
])

"""Layer inventory: every Conv1d/Conv2d/Linear of a model with shapes, MACs and parameters."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn

__all__ = ["LayerInfo", "inventory", "COMPRESSIBLE_TYPES"]

COMPRESSIBLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One compressible layer as seen on an example input.

    ``macs`` counts multiply-accumulates for one forward pass of the example input (batch
    included); ``params`` counts weight and bias elements.

    Example:
        >>> from torch import nn
        >>> import torch
        >>> info = inventory(nn.Sequential(nn.Linear(4, 3)), torch.zeros(1, 4))[0]
        >>> (info.name, info.kind, info.macs, info.params)
        ('0', 'linear', 12, 15)
    """

    name: str
    kind: Literal["conv1d", "conv2d", "linear"]
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    params: int
    macs: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    order: int

    @property
    def is_depthwise(self) -> bool:
        """True for a depthwise convolution (one group per input channel)."""
        return self.kind != "linear" and self.groups > 1 and self.groups == self.in_channels

    @property
    def full_rank(self) -> int:
        """Rank of the weight matrix reshaped to (out, in/groups * prod(kernel))."""
        return min(self.out_channels, (self.in_channels // self.groups) * math.prod(self.kernel_size))


def _kind(module: nn.Module) -> Literal["conv1d", "conv2d", "linear"]:
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return "linear"


def macs(out_elems: int, in_channels: int, groups: int = 1, kernel_area: int = 1) -> int:
    """The one MAC formula: every output element sums ``in_channels / groups × kernel_area``
    products (a Linear: groups 1, kernel area 1). Inventory, energy and the latency model's
    kernels all count with it.

    Example:
        >>> macs(8 * 6 * 6, 3, kernel_area=9), macs(10, 64)
        (7776, 640)
    """
    return out_elems * (in_channels // groups) * kernel_area


def layer_macs(module: nn.Module, out_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one Conv/Linear call that produced ``out_shape``.

    Example:
        >>> layer_macs(nn.Conv2d(3, 8, 3), (1, 8, 6, 6))
        7776
    """
    numel = math.prod(out_shape)
    if isinstance(module, nn.Linear):
        return macs(numel, module.in_features)
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))
    return macs(numel, module.in_channels, module.groups, math.prod(module.kernel_size))


def inventory(model: nn.Module, example_input: torch.Tensor) -> list[LayerInfo]:
    """List every Conv1d/Conv2d/Linear layer of ``model`` in execution order.

    Layers that the example forward pass never calls are left out (they do no work).
    The model is run once in eval mode under ``torch.no_grad``; it is not modified.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        >>> [i.name for i in inventory(m, torch.zeros(1, 1, 8, 8))]
        ['0', '2']
    """
    names = {m: n for n, m in model.named_modules()}
    seen: dict[str, LayerInfo] = {}
    hooks = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        name = names[module]
        if name in seen:  # a layer called twice (weight sharing) counts its work twice
            old = seen[name]
            seen[name] = dataclasses.replace(old, macs=old.macs + layer_macs(module, tuple(output.shape)))
            return
        if isinstance(module, nn.Linear):
            cin, cout, k, s, g = module.in_features, module.out_features, (1,), (1,), 1
        else:
            cin, cout = module.in_channels, module.out_channels
            k, s, g = tuple(module.kernel_size), tuple(module.stride), module.groups
        seen[name] = LayerInfo(
            name=name,
            kind=_kind(module),
            in_channels=cin,
            out_channels=cout,
            kernel_size=k,
            stride=s,
            groups=g,
            params=sum(p.numel() for p in module.parameters(recurse=False)),
            macs=layer_macs(module, tuple(output.shape)),
            in_shape=tuple(inputs[0].shape),
            out_shape=tuple(output.shape),
            order=len(seen),
        )

    for module in model.modules():
        if isinstance(module, COMPRESSIBLE_TYPES):
            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return sorted(seen.values(), key=lambda i: i.order)

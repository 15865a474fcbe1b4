"""Low-rank factorization of Conv/Linear layers by truncated SVD."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["factorize", "factorized_params", "rank_for", "svd_pair"]


def rank_for(full_rank: int, ratio: float) -> int:
    """Kept rank for a ratio of full rank (at least 1).

    Example:
        >>> rank_for(64, 0.25), rank_for(3, 0.1)
        (16, 1)
    """
    return max(1, min(full_rank, math.ceil(ratio * full_rank - 1e-9)))


def _dims(layer: nn.Module) -> tuple[int, int, int]:
    """(out, in, prod(kernel)) of a Linear or a groups=1 Conv."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features, 1
    return layer.out_channels, layer.in_channels, math.prod(layer.kernel_size)


def factorized_params(out: int, inp: int, k: int, rank: int) -> int:
    """Weight elements of the factorized pair (``rank*(inp*k) + out*rank``).

    Example:
        >>> factorized_params(64, 64, 9, 8)
        5120
    """
    return rank * (inp * k + out)


def factorize(layer: nn.Module, ratio: float) -> nn.Sequential | None:
    """Replace ``layer`` by two thinner layers from its truncated SVD, or ``None`` if not smaller.

    Linear(in, out) becomes Linear(in, r, bias=False) then Linear(r, out). A k×k Conv with
    ``groups == 1`` becomes a k×k Conv with r filters (same stride/padding/dilation) then a 1×1
    Conv to ``out`` channels carrying the bias. Singular values are split evenly (sqrt) between
    the two factors so neither one's weights blow up. At full rank the pair reproduces the
    layer up to float round-off.

    Example:
        >>> pair = factorize(nn.Linear(64, 64), 0.25)
        >>> [tuple(m.weight.shape) for m in pair]
        [(16, 64), (64, 16)]
    """
    if not isinstance(layer, nn.Linear) and getattr(layer, "groups", 1) != 1:
        return None
    out, inp, k = _dims(layer)
    r = rank_for(min(out, inp * k), ratio)
    if factorized_params(out, inp, k, r) >= out * inp * k:
        return None
    return svd_pair(layer, r)


def svd_pair(layer: nn.Module, r: int) -> nn.Sequential:
    """The two-layer truncated-SVD factorization of ``layer`` at rank ``r`` (no size check).

    Example:
        >>> lin = nn.Linear(8, 4)
        >>> x = torch.randn(2, 8)
        >>> bool(torch.allclose(svd_pair(lin, 4)(x), lin(x), atol=1e-5))
        True
    """
    out, inp, k = _dims(layer)
    w = layer.weight.detach().reshape(out, inp * k).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:r].sqrt()
    first_w = (root[:, None] * vh[:r]).float()
    second_w = (u[:, :r] * root[None, :]).float()
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        first = nn.Linear(inp, r, bias=False)
        second = nn.Linear(r, out, bias=bias)
        first.weight.data.copy_(first_w)
        second.weight.data.copy_(second_w)
    else:
        # the plain class: a subclass reaches here only when its forward is the plain op (forward_is_plain)
        conv = nn.Conv1d if isinstance(layer, nn.Conv1d) else nn.Conv2d
        first = conv(inp, r, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                     dilation=layer.dilation, bias=False, padding_mode=layer.padding_mode)
        second = conv(r, out, 1, bias=bias)
        first.weight.data.copy_(first_w.reshape(r, inp, *layer.kernel_size))
        second.weight.data.copy_(second_w.reshape(out, r, *([1] * len(layer.kernel_size))))
    if bias:
        second.bias.data.copy_(layer.bias.detach())
    pair = nn.Sequential(first, second)
    pair.train(layer.training)
    return pair.to(layer.weight.device)

"""Whole-network structures for calibration: random small networks built from the blocks real
models are made of (plain conv stacks with pools, residual basic blocks, inverted residuals,
classifier heads), each compressed by a random plan (pruning, low-rank pairs, int8/int4) and
exported exactly as a candidate ships. Calibration measures each whole and kernel by kernel, so
the latency model gets design points at the shapes networks have and learns what kernels do
inside networks (shared layout reorders, int8 hand-overs, folded Adds, per-kernel dispatch) from
networks it will never be checked on, not only from synthetic chains."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.objectives.devices import extract_graph
from edgeslim.spaces import CompressionSpace

__all__ = ["STRUCTURES", "STRUCTURE_FAMILIES", "random_structure", "structure_networks"]

# random networks per calibration mode; each costs about 2.5 s of export and 1 s of timing (itself
# and its ~20 kernels alone) on a 2-core x86
STRUCTURES = {"quick": 16, "full": 60}
_STRUCTURE_SEED = 1299709
_MAX_MACS = 400_000_000  # keeps each network under a few milliseconds on a small CPU
_MAX_WEIGHTS = 1_500_000  # and its file a few MB (kits carry them to remote devices)
_WIDTHS = (8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 256)


def _cbr(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type[nn.Module] = nn.ReLU
         ) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act()]


class _Basic(nn.Module):
    """Two 3x3 convs and a skip (a 1x1 conv where the shape changes), ReLU after the Add."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_cbr(cin, cout, 3, stride),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.skip(x))


class _Inverted(nn.Module):
    """1x1 expansion, depthwise 3x3, 1x1 projection; an Add where input and output shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        layers = _cbr(cin, mid, 1, act=nn.ReLU6) if expand != 1 else []
        layers += _cbr(mid, mid, 3, stride, groups=mid, act=nn.ReLU6)
        layers += [nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


def _head(c: int, rng: np.random.Generator, classes: int) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if rng.random() < 0.4:
        hidden = int(rng.choice((64, 128, 256)))
        layers += [nn.Linear(c, hidden), nn.ReLU()]
        c = hidden
    return layers + [nn.Linear(c, classes)]


def _plain(rng: np.random.Generator, cin: int, size: int) -> nn.Module:
    layers: list[nn.Module] = []
    c = int(rng.choice(_WIDTHS[:6]))
    layers += _cbr(cin, c, 3)
    for _ in range(int(rng.integers(2, 6))):
        cout = int(min(max(c * rng.choice((1, 1, 2)), 8), 256))
        if size > 4 and rng.random() < 0.35:
            layers.append(nn.MaxPool2d(2))
            size //= 2
            layers += _cbr(c, cout, 3)
        else:
            stride = 2 if size > 4 and rng.random() < 0.3 else 1
            size //= stride
            layers += _cbr(c, cout, int(rng.choice((1, 3, 3))), stride)
        c = cout
    return nn.Sequential(*layers, *_head(c, rng, int(rng.choice((10, 100)))))


def _residual(rng: np.random.Generator, cin: int, size: int) -> nn.Module:
    c = int(rng.choice(_WIDTHS[2:8]))
    layers: list[nn.Module] = _cbr(cin, c, int(rng.choice((3, 7))), 2 if size >= 64 else 1)
    if size >= 64 and rng.random() < 0.7:
        layers.append(nn.MaxPool2d(3, 2, 1))
    for _ in range(int(rng.integers(2, 7))):
        down = rng.random() < 0.4
        cout = int(min(c * 2, 512)) if down else c
        layers.append(_Basic(c, cout, 2 if down else 1))
        c = cout
    return nn.Sequential(*layers, *_head(c, rng, int(rng.choice((10, 100, 1000)))))


def _inverted(rng: np.random.Generator, cin: int, size: int) -> nn.Module:
    c = int(rng.choice((16, 24, 32)))
    layers: list[nn.Module] = _cbr(cin, c, 3, 2 if size >= 32 else 1, act=nn.ReLU6)
    for _ in range(int(rng.integers(3, 9))):
        down = rng.random() < 0.3
        cout = int(rng.choice((c, c, min(int(c * 1.5) // 8 * 8, 320))))
        layers.append(_Inverted(c, cout, 2 if down else 1, int(rng.choice((1, 3, 6, 6)))))
        c = cout
    last = int(rng.choice((c * 4, 320, 640)))
    layers += _cbr(c, last, 1, act=nn.ReLU6)
    return nn.Sequential(*layers, *_head(last, rng, int(rng.choice((10, 100, 1000)))))


# family -> (builder, input sizes drawn from)
STRUCTURE_FAMILIES: dict[str, tuple[Callable[[np.random.Generator, int, int], nn.Module], tuple[int, ...]]] = {
    "plain": (_plain, (8, 16, 28, 32, 48, 64)),
    "residual": (_residual, (16, 32, 48, 64, 96, 112)),
    "inverted": (_inverted, (32, 64, 96, 128, 160)),
}


def random_structure(rng: np.random.Generator) -> tuple[str, nn.Module, torch.Tensor]:
    """A random network of a random family (``STRUCTURE_FAMILIES``) with an input it takes, kept
    under ``_MAX_MACS`` and ``_MAX_WEIGHTS`` (drawn again when over).

    Example:
        >>> family, model, x = random_structure(np.random.default_rng(0))
        >>> family in STRUCTURE_FAMILIES, model(x).shape[0]
        (True, 1)
    """
    while True:
        family = str(rng.choice(list(STRUCTURE_FAMILIES)))
        build, sizes = STRUCTURE_FAMILIES[family]
        size, cin = int(rng.choice(sizes)), int(rng.choice((1, 3)))
        model = build(rng, cin, size).eval()
        x = torch.randn(1, cin, size, size)
        kernels, _ = extract_graph(model, x)
        if sum(k.macs for k in kernels) <= _MAX_MACS and sum(k.weight_elems for k in kernels) <= _MAX_WEIGHTS:
            return family, model, x


def structure_networks(n: int, workdir: Path, seed: int = 0,
                       progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """``n`` random networks (see :func:`random_structure`), each compressed by a random plan of
    its own space (the first of each family dense), exported into ``workdir`` as candidates
    ship. Entries as :func:`edgeslim.search.focus_networks` gives them: ``name``, ``path``,
    ``kernels``, ``edges``.

    Example:
        >>> nets = structure_networks(2, Path(tmp))  # doctest: +SKIP
        >>> len(nets), sorted(nets[0])  # doctest: +SKIP
        (2, ['edges', 'kernels', 'name', 'path'])
    """
    rng = np.random.default_rng(seed + _STRUCTURE_SEED)
    torch.manual_seed(seed + _STRUCTURE_SEED)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    log = logging.getLogger("edgeslim")
    level = log.level
    log.setLevel(max(level, logging.WARNING))  # realizing random plans notes every layer it keeps whole
    try:
        for i in range(n):
            out.append(_structure(rng, i, workdir, seen))
            if progress:
                progress(i + 1, n)
    finally:
        log.setLevel(level)
    return out


def _structure(rng: np.random.Generator, i: int, workdir: Path, seen: set[str]) -> dict[str, Any]:
    """Network ``i``: drawn, compressed (dense for a family's first, see ``seen``) and exported."""
    from edgeslim.search._check import _export_candidate, random_plan

    family, model, x = random_structure(rng)
    space = CompressionSpace.build(model, x)
    plan = space.dense_plan() if family not in seen else random_plan(space, rng)
    seen.add(family)
    realized = space.realize(model, plan)
    path = _export_candidate(realized, x, workdir, f"structure{i}")
    kernels, edges = extract_graph(realized, x)
    return {"name": f"{family}{i}", "path": str(path), "kernels": kernels, "edges": edges}

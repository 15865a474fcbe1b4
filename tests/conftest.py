"""Shared fixtures: small models and the digits data, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn


class TinyResidual(nn.Module):
    """Conv stem, one residual block (coupled channels), linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.conv2(torch.relu(self.conv1(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture()
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return TinyResidual().eval()


@pytest.fixture()
def example() -> torch.Tensor:
    return torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def digits():
    from edgeslim.search import digits_splits

    return digits_splits(8, 0.3, 0)[0]


@pytest.fixture(scope="session")
def digits_resnet(tmp_path_factory):
    """The built-in digits-resnet workload, its base trained once for the whole session (~1 min)."""
    from edgeslim.search import load_workload
    from edgeslim.search._spec import load_spec

    spec = load_spec(Path(__file__).parents[1] / "studies" / "digits-resnet.toml")
    return spec, load_workload(spec, tmp_path_factory.mktemp("digits-resnet"), log=lambda _: None)


@pytest.fixture(scope="session")
def digits_cnn(tmp_path_factory):
    """The built-in digits CNN workload of the demo spec, trained once for the whole session (~10 s)."""
    from edgeslim.search import demo_spec, load_workload

    return load_workload(demo_spec(), tmp_path_factory.mktemp("digits-cnn"), log=lambda _: None)

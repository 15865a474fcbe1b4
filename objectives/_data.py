"""Batching helpers shared by fine-tuning, evaluation and calibration."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["batches", "sample_inputs"]


def batches(dataset: Dataset, batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches; in-memory ``TensorDataset``s are sliced without a DataLoader.

    Example:
        >>> d = TensorDataset(torch.arange(5.0)[:, None], torch.arange(5))
        >>> [y.tolist() for _, y in batches(d, 2)]
        [[0, 1], [2, 3], [4]]
    """
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[0], dataset.tensors[1]
        n = len(x)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            yield x[idx], y[idx]
        return
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)
    for x, y in loader:
        yield x, torch.as_tensor(y)


def sample_inputs(dataset: Dataset, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` single-sample input batches (shape ``(1, ...)``) drawn from ``dataset``.

    Example:
        >>> d = TensorDataset(torch.zeros(10, 3), torch.zeros(10))
        >>> [t.shape for t in sample_inputs(d, 2)]
        [torch.Size([1, 3]), torch.Size([1, 3])]
    """
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:count].tolist()
    return [torch.as_tensor(dataset[i][0]).unsqueeze(0) for i in idx]

"""Batching helpers shared by fine-tuning, evaluation and calibration."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["batches", "is_label_free", "sample_inputs", "teacher_labelled"]


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


def _input_of(item: Any) -> torch.Tensor:
    return torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item)


def is_label_free(dataset: Dataset) -> bool:
    """Whether ``dataset`` yields inputs only (a tensor, or a 1-tuple), not ``(input, label)``.

    Example:
        >>> is_label_free(TensorDataset(torch.zeros(3, 2))), is_label_free(TensorDataset(torch.zeros(3, 2), torch.zeros(3)))
        (True, False)
    """
    if len(dataset) == 0:
        return False
    item = dataset[0]
    return not isinstance(item, (tuple, list)) or len(item) == 1


class _Labelled(Dataset):
    def __init__(self, inputs: Dataset, labels: torch.Tensor) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _input_of(self.inputs[i]), self.labels[i]


@torch.no_grad()
def teacher_labelled(inputs: Dataset, teacher: Callable[[torch.Tensor], torch.Tensor],
                     batch_size: int = 256) -> Dataset:
    """A label-free ``inputs`` dataset with the teacher's top-1 as each sample's label: fine-tuning
    then learns the dense model's decisions and "accuracy" is agreement with it. In-memory
    tensors stay a ``TensorDataset`` (sliced without a DataLoader).

    Example:
        >>> d = teacher_labelled(TensorDataset(torch.eye(3)), lambda x: x)
        >>> [int(y) for _, y in d]
        [0, 1, 2]
    """
    if isinstance(inputs, TensorDataset):
        x = inputs.tensors[0]
        labels = torch.cat([teacher(x[i:i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)])
        return TensorDataset(x, labels)
    loader = DataLoader(inputs, batch_size=batch_size, collate_fn=lambda items: torch.stack([_input_of(i) for i in items]))
    labels = torch.cat([teacher(x).argmax(-1) for x in loader])
    return _Labelled(inputs, labels)

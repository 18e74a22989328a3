"""What the trainer trains on: map-style datasets plus how to batch them.

Any ``torch.utils.data.Dataset`` with ``__len__`` and ``__getitem__`` works (the user's, from
``data.target``); a sample is whatever the step function expects of a batch once collated
(``(input, target)`` pairs and ``{"input_ids": ..., "labels": ...}`` dicts for the built-in
cross-entropy step). The built-in kinds are :class:`TensorPairs`, which fetch a whole batch
with one indexing op (``__getitems__``, as torch's DataLoader calls it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset


@dataclasses.dataclass
class Data:
    train: Dataset
    eval: Dataset | None = None
    collate: Callable[[list], Any] | None = None  # None: torch's default_collate
    unit: str | None = None  # what a step function's count counts, for throughput lines ("token")
    # Units the step counts per sample when that is fixed (tokens of a fixed-length window): the trainer
    # then divides by the expected global count up front and needs no rescaling when it is met.
    units_per_sample: int | None = None


def keep_batch(batch: Any) -> Any:
    """The collate of datasets whose ``__getitems__`` already returns a batch."""
    return batch


class TensorPairs(Dataset):
    """``(x, y)`` pairs of an in-memory task, fetched by ``fetch(idx, split) -> (x[idx], y[idx])``."""

    def __init__(self, fetch: Callable[[torch.Tensor, str], tuple], size: int, split: str):
        self.fetch, self.size, self.split = fetch, size, split

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        x, y = self.fetch(torch.tensor([i]), self.split)
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]):
        return self.fetch(torch.as_tensor(indices, dtype=torch.int64), self.split)


def as_data(value: Any, collate: Callable | None = None) -> Data:
    """``Data`` from what a user passes: a Data, a ``(train, eval)`` pair or one training Dataset."""
    if isinstance(value, Data):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return Data(value[0], value[1], collate)
    return Data(value, None, collate)


def to_device(batch: Any, device: str | torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (tensors, tuples, lists, dicts and their nests)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):  # dicts, transformers' BatchEncoding: a plain dict of the moved values
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(to_device(v, device) for v in batch)
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    return batch

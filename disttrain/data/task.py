"""A Task bundles an in-memory dataset (the built-in kinds), how to fetch samples by index, and
how to score a model on it.

Losses are *sums* over samples (or tokens); the trainer divides by the global count, so
any split of a global batch across ranks and micro-batches gives the same gradient.
Builders live in ``builder.py``; the datasets of each kind in their own modules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..parallel.tensor.vocab import cross_entropy
from .dataset import Data, TensorPairs, keep_batch


@dataclasses.dataclass
class Task:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    num_classes: int  # classes, or vocabulary size for a language model
    fetch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    units_per_sample: int = 1  # tokens per sample for throughput (1 for classification)
    is_lm: bool = False
    vocab: str | None = None

    @property
    def num_train(self) -> int:
        """Samples the sampler draws from (window offsets for a language model)."""
        return len(self.train_y)

    @property
    def num_eval(self) -> int:
        return len(self.eval_y)

    @property
    def num_inputs(self) -> int:
        """Input features of a classifier (0 for a language model, whose inputs are token ids)."""
        return 0 if self.is_lm else int(self.train_x.shape[1])

    def batch(self, idx: torch.Tensor, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (self.train_x, self.train_y) if split == "train" else (self.eval_x, self.eval_y)
        return self.fetch(x, y, idx)

    def loss_sum(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sum of cross-entropy over every sample (or token); logits may be split by vocabulary (tp)."""
        return cross_entropy(logits, y, reduction="sum")

    def count(self, y: torch.Tensor) -> int:
        return y.numel()

    def data(self) -> Data:
        """The task as map-style datasets of (input, target) pairs, fetched a batch at a time."""
        return Data(
            TensorPairs(self.batch, self.num_train, "train"),
            TensorPairs(self.batch, self.num_eval, "eval") if self.num_eval else None,
            collate=keep_batch,
            unit="token" if self.is_lm else "sample",
            units_per_sample=self.units_per_sample,
        )


def index_fetch(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
    return x[idx], y[idx]

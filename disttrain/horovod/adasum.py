"""Adasum (Maleki et al., "Scaling Distributed Training with Adaptive Summation"), as Horovod's
CPU path combines gradients: pairwise ``(1 - a.b/2|a|^2) a + (1 - a.b/2|b|^2) b`` up a binary
tree of ranks (0+1, 2+3, then the pairs). Power-of-two set sizes only, as in Horovod."""

from __future__ import annotations

import torch


def pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dot, na, nb = torch.dot(a, b), torch.dot(a, a), torch.dot(b, b)
    ca = 1.0 - dot / (2 * na) if na > 0 else 1.0
    cb = 1.0 - dot / (2 * nb) if nb > 0 else 1.0
    return ca * a + cb * b


def tree(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Every rank's flat float64 vector (in set-rank order) combined as Horovod's tree does."""
    vals = list(vectors)
    while len(vals) > 1:
        vals = [pair(vals[k], vals[k + 1]) for k in range(0, len(vals), 2)]
    return vals[0]

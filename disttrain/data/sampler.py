"""Every rank sees its share of each global batch; the global batch never depends on the world size.

Step ``s`` draws global batch ``s`` from a seeded permutation of the dataset (a new
permutation per epoch); rank r of W takes the contiguous slice ``[r*B//W, (r+1)*B//W)``.
So N ranks see exactly the samples one process would, the data position is just the
step number (it reshards to any world size), and uneven splits are allowed.
"""

from __future__ import annotations

import torch


class GlobalBatchSampler:
    def __init__(self, num_samples: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if global_batch > num_samples:
            raise ValueError(f"global batch {global_batch} is larger than the dataset ({num_samples} samples)")
        self.n, self.batch, self.seed, self.rank, self.world = num_samples, global_batch, seed, rank, world_size
        self.batches_per_epoch = num_samples // global_batch
        self._epoch, self._perm = -1, None

    def global_batch(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[k * self.batch : (k + 1) * self.batch]

    def local_slice(self, size: int, rank: int | None = None) -> slice:
        r = self.rank if rank is None else rank
        return slice(r * size // self.world, (r + 1) * size // self.world)

    def local_batch(self, step: int) -> torch.Tensor:
        """Indices this rank processes at ``step`` (possibly empty when the batch < world size)."""
        return self.global_batch(step)[self.local_slice(self.batch)]


def micro_slices(idx: torch.Tensor, grad_accum: int) -> list[torch.Tensor]:
    """``idx`` cut into ``grad_accum`` contiguous micro-batches (all empty when ``idx`` is)."""
    return list(torch.tensor_split(idx, grad_accum)) if len(idx) else [idx] * grad_accum

"""``hvd.elastic.ElasticSampler``: a torch sampler whose data position survives changes of world.

    sampler = hvd.elastic.ElasticSampler(dataset, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=bs, sampler=sampler)
    state = hvd.elastic.TorchState(model, optimizer, sampler=sampler, epoch=0)

    @hvd.elastic.run
    def train(state):
        for state.epoch in range(state.epoch, epochs):
            for i, batch in enumerate(loader):      # this world's share of what is left
                ...
                state.sampler.record_batch(i, bs)   # then commit() now and then
                state.commit()
            state.sampler.set_epoch(state.epoch + 1)

Every rank holds the same shuffled order of the epoch (seed + epoch) and the same count of
*positions* of it processed by the whole world (``processed_num``): ranks step together, each
taking every ``size()``-th of the remaining indices, so after ``b`` batches of ``bs`` the first
``b * bs * size()`` positions are done whichever rank did them. The count is all the state there
is, so it needs no allgather: ``TorchState`` keeps it with the commits (``restore`` goes back to
it), ``sync`` gives a joiner rank 0's, and each reset re-deals what is left over the new world.
No sample is skipped or seen twice across resets; as with ``DistributedSampler``, an epoch whose
remainder does not divide by the world size repeats its first few remaining samples to even out
the last batch (commit where the processed count divides by every world size you expect, and
the remainder divides too).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sized

import torch.utils.data

from .. import basics


class ElasticSampler(torch.utils.data.Sampler):
    """Horovod's ``ElasticSampler(dataset, shuffle=True, seed=0)``; every rank builds it alike
    (same dataset length and seed). Call ``record_batch`` after each batch (every rank),
    ``set_epoch`` at the *end* of an epoch."""

    def __init__(self, dataset: Sized, shuffle: bool = True, seed: int = 0):
        self.dataset, self.shuffle, self.seed = dataset, shuffle, seed
        self.epoch = 0
        self.processed_num = 0  # positions of this epoch's order done by the whole world
        self.remaining_indices: list[int] = []
        self.indices: list[int] = []
        self.num_replicas, self.rank, self.num_samples, self.total_size = 1, 0, 0, 0
        self.reset()

    def set_epoch(self, epoch: int) -> None:
        """At the end of an epoch: a new order (seed + epoch), nothing processed yet."""
        self.epoch, self.processed_num = epoch, 0
        self.reset()

    def record_batch(self, batch_idx: int, batch_size: int) -> None:
        """Every rank, after each batch of ``batch_size`` samples per rank (``batch_idx`` is kept
        for Horovod's signature: the count alone says where the world is)."""
        self.processed_num += batch_size * self.num_replicas

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "processed_num": self.processed_num}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.processed_num = int(state["epoch"]), int(state["processed_num"])
        self.reset()

    def reset(self) -> None:
        """Deal what is left of the epoch over the current world (``hvd.size()``, ``hvd.rank()``)."""
        initialized = basics.is_initialized()
        self.num_replicas = basics.size() if initialized else 1
        self.rank = basics.rank() if initialized else 0
        order = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        self.remaining_indices = order[self.processed_num :]
        self.num_samples = math.ceil(len(self.remaining_indices) / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        left = self.remaining_indices
        padded = left + (left * self.num_replicas)[: self.total_size - len(left)]  # an even last batch
        self.indices = padded[self.rank : self.total_size : self.num_replicas]
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples

"""Batches of one rank, step by step, from any map-style Dataset (or a stream: stream.py).

Step ``s`` of this rank is ``GlobalBatchSampler.local_batch(s)`` cut into ``grad_accum``
micro-batches (``torch.tensor_split``: sizes differ by at most one, some may be empty when
the local batch is small). A torch DataLoader reads them (``num_workers`` processes, or this
one), starting at any step: the data position is the step number, so a resumed run reads
exactly the samples the uninterrupted one would have, at any world size.

Who calls: the trainer, on every rank, in step order; ``micro_batches(step)`` yields one
entry per micro-batch, the batch or None for an empty one (the rank still takes part in
the step's collectives).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .sampler import GlobalBatchSampler, micro_slices
from .stream import StreamMicroBatches, StreamSampler, is_stream, stream_eval_batches
from .workers import WorkerStart, loader_options, started

__all__ = ["StepLoader", "eval_batches", "eval_split", "micro_slices"]


def _as_is(x: Any) -> Any:
    return x


class _MicroBatchIndices(Sampler[list[int]]):
    """The DataLoader's batch sampler: the non-empty micro-batches of steps start, start+1, ..."""

    def __init__(self, sampler: GlobalBatchSampler, grad_accum: int, start: int):
        self.sampler, self.grad_accum, self.start = sampler, grad_accum, start

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            for mb in micro_slices(self.sampler.local_batch(step), self.grad_accum):
                if len(mb):
                    yield mb.tolist()
            step += 1


class StepLoader:
    def __init__(
        self,
        dataset: Dataset,
        sampler: GlobalBatchSampler | StreamSampler,
        grad_accum: int,
        start: int,
        collate: Callable[[list], Any] | None = None,
        num_workers: int = 0,
        worker_start: WorkerStart = "forkserver",
    ):
        self.sampler, self.grad_accum, self.next_step = sampler, grad_accum, start
        # A generator of its own: the DataLoader draws its workers' base seed from it, never from the
        # global RNG (a resumed run must consume exactly the random numbers the uninterrupted one did).
        gen = torch.Generator().manual_seed(sampler.seed * 1_000_003 + start * 1009 + sampler.rank)
        self.stream = isinstance(sampler, StreamSampler)
        workers = loader_options(num_workers, worker_start, dataset, collate)  # workers.py: why forkserver
        if self.stream:  # batches come collated, with the stream's state at step ends (stream.py)
            self.loader = DataLoader(
                StreamMicroBatches(dataset, sampler, grad_accum, start, collate),
                batch_size=None,
                collate_fn=_as_is,
                generator=gen,
                **workers,
            )
        else:
            self.loader = DataLoader(
                dataset,
                batch_sampler=_MicroBatchIndices(sampler, grad_accum, start),
                collate_fn=collate,
                generator=gen,
                **workers,
            )
        self._it: Iterator | None = None

    def micro_batches(self, step: int) -> Iterator[Any | None]:
        """This rank's micro-batches of ``step`` (None for an empty one). Steps must come in order."""
        if step != self.next_step:
            raise RuntimeError(f"StepLoader: asked for step {step}, positioned at step {self.next_step}")
        if self._it is None:
            self._it = started(self.loader, self.sampler.rank, "training")
        self.next_step += 1
        for mb in micro_slices(self.sampler.local_batch(step), self.grad_accum):
            if not len(mb):
                yield None
            elif self.stream:
                batch, state = next(self._it)
                if state is not None:
                    self.sampler.seen_state = (step + 1, state)
                yield batch
            else:
                yield next(self._it)

    def close(self) -> None:
        """Stop the worker processes (if any)."""
        self._it = None


def eval_batches(
    dataset: Dataset,
    indices: torch.Tensor,
    batch: int,
    collate: Callable[[list], Any] | None = None,
    num_workers: int = 0,
    worker_start: WorkerStart = "forkserver",
    rank: int = 0,
) -> Iterator:
    """Batches over ``indices`` of ``dataset`` in chunks of ``batch`` (evaluation); workers start on
    the first ``next``."""
    chunks = [c.tolist() for c in torch.split(indices, max(1, batch)) if len(c)]
    workers = loader_options(num_workers, worker_start, dataset, collate)
    loader = DataLoader(dataset, batch_sampler=chunks, collate_fn=collate, generator=torch.Generator(), **workers)
    yield from started(loader, rank, "evaluation")


def eval_split(
    dataset,
    max_samples: int,
    rank: int,
    world: int,
    batch: int,
    collate: Callable[[list], Any] | None = None,
    num_workers: int = 0,
    worker_start: WorkerStart = "forkserver",
) -> tuple[Iterable, int]:
    """This rank's evaluation batches and its sample count: ``max_samples`` (rounded down to a multiple of
    ``world``, at least ``world``: a tiny eval split repeats samples) evenly spaced samples of a map-style
    dataset, or a stream's first ones, split contiguously over the ranks."""
    if is_stream(dataset):
        n = max(world, max_samples - max_samples % world)
        return stream_eval_batches(dataset, n, rank, world, batch, collate), (rank + 1) * n // world - rank * n // world
    n = min(len(dataset), max_samples)
    n = max(world, n - n % world)
    idx = torch.linspace(0, len(dataset) - 1, n).long()
    mine = idx[rank * n // world : (rank + 1) * n // world]
    return eval_batches(dataset, mine, batch, collate, num_workers, worker_start, rank), len(mine)

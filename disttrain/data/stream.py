"""Streaming datasets: a torch ``IterableDataset`` (no ``__len__``, no indexing), read in order.

The stream's samples are numbered by their position (a stream that ends starts a new pass, and the
numbering goes on). Global batch ``s`` is the next ``train.batch_size`` samples; rank r of W takes
the same contiguous slice of it as with a map-style dataset (:class:`StreamSampler` has
``GlobalBatchSampler``'s interface, its "indices" being stream positions), so N ranks train on
exactly the samples one process would. Each rank reads the stream and keeps its own samples; with
DataLoader workers, worker w of n keeps this rank's micro-batches j with ``j % n == w`` (the
DataLoader hands them out in that round-robin order).

Resume continues at the exact sample, at any world size or batch size: the checkpoint records how
many samples the run had consumed, and the dataset's ``state_dict()`` at that point when the dataset
has one (``load_state_dict`` then puts every rank's copy there); without one, each rank counts its
way there from the start of the stream.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from ..errors import DisttrainError
from .sampler import GlobalBatchSampler, micro_slices

log = logging.getLogger(__name__)


@runtime_checkable
class StatefulStream(Protocol):
    """A stream that can say where its iteration is (``state_dict``, JSON-serialisable, called while it
    is being iterated) and continue there (``load_state_dict`` before the next ``iter``): the protocol of
    torchdata's Stateful and of Hugging Face datasets' IterableDataset."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def is_stream(dataset: Any) -> bool:
    """True for a dataset read by iteration only: an IterableDataset, or anything without ``__len__``."""
    return isinstance(dataset, IterableDataset) or not hasattr(type(dataset), "__len__")


def require_steps(dataset: Any, train_cfg) -> None:
    """A stream has no length, so no epochs: the run's length must be given (``train.steps``)."""
    if "steps" not in train_cfg.model_fields_set:
        raise DisttrainError(
            f"train.steps: the training dataset ({type(dataset).__qualname__}) has no __len__ (a stream), so "
            "the run's length must be set\nHINT: set train.steps: N in the YAML, or train.steps=N as an override"
        )


class StreamSampler:
    """``GlobalBatchSampler``'s interface over a stream: global batch ``s`` is stream positions
    ``[position(s), position(s) + batch)``. Who calls: the trainer and the loader, on every rank."""

    def __init__(self, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        self.batch, self.seed, self.rank, self.world = global_batch, seed, rank, world_size
        self.base_step, self.base_samples = 0, 0  # the position of base_step (moved by a resume)
        self.resume_state: dict | None = None  # the dataset's state at base_samples, from a checkpoint
        self.seen_state: tuple[int, dict] | None = None  # (step, the dataset's state at that step's start)

    def position(self, step: int) -> int:
        return self.base_samples + (step - self.base_step) * self.batch

    def global_batch(self, step: int) -> torch.Tensor:
        return torch.arange(self.position(step), self.position(step) + self.batch)

    def local_slice(self, size: int, rank: int | None = None) -> slice:
        r = self.rank if rank is None else rank
        return slice(r * size // self.world, (r + 1) * size // self.world)

    def local_batch(self, step: int) -> torch.Tensor:
        return self.global_batch(step)[self.local_slice(self.batch)]

    # -- checkpoints (checkpoint/state.py) ------------------------------------------------
    def data_state(self, step: int) -> dict:
        """What a checkpoint at ``step`` records: samples consumed, and the dataset's state there if known."""
        out: dict = {"samples": self.position(step)}
        if self.seen_state is not None and self.seen_state[0] == step:
            try:
                json.dumps(self.seen_state[1])
                out["stream_state"] = self.seen_state[1]
            except (TypeError, ValueError) as exc:
                log.warning("the dataset's state_dict() is not JSON (%s): a resume will count samples instead", exc)
        return out

    def load_data_state(self, step: int, state: dict) -> None:
        """After a resume at ``step``: continue at the recorded sample (a map-style checkpoint: step x batch)."""
        self.base_step = step
        self.base_samples = int(state.get("samples", step * int(state.get("global_batch", self.batch))))
        self.resume_state = state.get("stream_state")
        self.seen_state = None


class _Cursor:
    """Reads a stream by position: skips to a position, takes the next samples; a new pass on exhaustion."""

    def __init__(self, dataset, position: int, state: dict | None):
        self.dataset, self.pos = dataset, 0
        if state is not None and isinstance(dataset, StatefulStream):
            dataset.load_state_dict(state)
            self.pos = position
        self._it = iter(dataset)
        self._pass_len = 0

    def _next(self) -> Any:
        while True:
            try:
                x = next(self._it)
            except StopIteration:
                if self._pass_len == 0 and self.pos == 0:
                    raise DisttrainError(f"the training stream ({type(self.dataset).__qualname__}) is empty") from None
                self._it, self._pass_len = iter(self.dataset), 0  # a new pass over the stream
                continue
            self.pos += 1
            self._pass_len += 1
            return x

    def skip_to(self, position: int) -> None:
        while self.pos < position:
            self._next()

    def take(self, n: int) -> list:
        return [self._next() for _ in range(n)]


class StreamMicroBatches(IterableDataset):
    """What a DataLoader over a stream iterates: this rank's (and this worker's) micro-batches from
    step ``start`` on, collated, each with the dataset's state at the next step's start when it is
    the step's last (for stateful streams; else None)."""

    def __init__(self, dataset, sampler: StreamSampler, grad_accum: int, start: int, collate: Callable | None):
        self.dataset, self.sampler, self.grad_accum, self.start = dataset, sampler, grad_accum, start
        self.collate = collate or default_collate

    def __iter__(self) -> Iterator[tuple[Any, dict | None]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        s = self.sampler
        state = s.resume_state if s.resume_state is not None and s.base_step <= self.start else None
        cursor = _Cursor(self.dataset, s.base_samples, state)
        stateful = isinstance(self.dataset, StatefulStream)
        j, step = 0, self.start
        while True:
            mbs = [mb for mb in micro_slices(s.local_batch(step), self.grad_accum) if len(mb)]
            for i, mb in enumerate(mbs):
                mine, j = j % nw == wid, j + 1
                if not mine:
                    continue
                cursor.skip_to(int(mb[0]))
                batch = self.collate(cursor.take(len(mb)))
                after = None
                if stateful and i == len(mbs) - 1:
                    cursor.skip_to(s.position(step + 1))
                    after = copy.deepcopy(self.dataset.state_dict())
                yield batch, after
            step += 1


def stream_eval_batches(
    dataset, n: int, rank: int, world: int, batch: int, collate: Callable | None = None
) -> Iterator[Any]:
    """Rank ``rank``'s contiguous share of the stream's first ``n`` samples, collated ``batch`` at a time."""
    collate = collate or default_collate
    cursor = _Cursor(dataset, 0, None)
    cursor.skip_to(rank * n // world)
    left = (rank + 1) * n // world - rank * n // world
    while left > 0:
        take = min(batch, left)
        yield collate(cursor.take(take))
        left -= take


def build_sampler(dataset, train_cfg, seed: int, rank: int, world_size: int):
    """The sampler of ``dataset``: by index for a map-style dataset, by stream position for a stream
    (which needs ``train.steps``). Every rank, identically."""
    if is_stream(dataset):
        require_steps(dataset, train_cfg)
        return StreamSampler(train_cfg.batch_size, seed, rank, world_size)
    return GlobalBatchSampler(len(dataset), train_cfg.batch_size, seed, rank, world_size)

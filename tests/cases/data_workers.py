"""Datasets for tests/test_data_workers.py, at module level so a forkserver's worker imports them.

``python -m tests.cases.data_workers TRACE_DIR``: a rank whose DataLoader worker is stuck in
``StuckDataset.__getitem__`` (the hang watch's view of a stuck worker)."""

from __future__ import annotations

import os
import sys
import threading

import torch
from torch.utils.data import Dataset

HELD = threading.Lock()  # a lock some other thread of the rank holds when the loader starts its workers


class Squares(Dataset):
    """Sample i is i*i; reading one takes HELD, as a logging handler or an allocator would."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> torch.Tensor:
        with HELD:
            return torch.tensor([i * i])


class StuckDataset(Squares):
    def __getitem__(self, i: int) -> torch.Tensor:
        threading.Event().wait()  # STUCK
        raise AssertionError("unreachable")


def hold_forever() -> threading.Event:
    """Another thread takes HELD and keeps it until the returned event is set."""
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with HELD:
            taken.set()
            release.wait()

    threading.Thread(target=hold, daemon=True).start()
    taken.wait()
    return release


if __name__ == "__main__":
    from collectives import flight_recorder
    from disttrain.data import GlobalBatchSampler, StepLoader

    os.environ.update(DISTTRAIN_TRACE_DIR=sys.argv[1], RANK="0")
    flight_recorder.maybe_start_watch(0, "here")  # as a rank under the launcher: beats, dumps, stacks
    loader = StepLoader(StuckDataset(), GlobalBatchSampler(16, 4, seed=0), 1, 0, num_workers=1)
    print("reading", flush=True)
    next(iter(loader.micro_batches(0)))

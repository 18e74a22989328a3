"""The carried check's header arithmetic (``collectives.carried``), in one process: what a SUM of the
frames of N ranks leaves in the header, and whether every rank reaches the same verdict. The multi-rank
behaviour (mismatches on mpi and torch, the group usable afterwards) is in the conformance suite."""

from __future__ import annotations

import struct

import pytest

from collectives import carried
from collectives.types import ReduceOp


class _Nobody:
    """Stands for a backend in what the arithmetic reads of it: the group's size."""

    def __init__(self, world: int):
        self.rank, self.world_size = 0, world


def _summed(frames: list[bytes]) -> bytes:
    """The element-wise float32 sum of several ranks' headers: what the frame's allreduce leaves."""
    n = len(frames[0]) // 4
    cols = [struct.unpack(f"{n}f", f) for f in frames]
    return struct.pack(f"{n}f", *(sum(c[i] for c in cols) for i in range(n)))


def _verdicts(frame: carried.Frame, digests: list[tuple[int, int]]) -> list[bool]:
    headers = [frame.header(base, seq) for base, seq in digests]
    total = _summed([own for own, _ in headers])
    return [total == expected for _, expected in headers]


@pytest.mark.unit
@pytest.mark.parametrize("world", [2, 3, 5, 64, 65536])
def test_agreeing_ranks_pass_and_sums_stay_exact(world):
    frame = carried.Frame(_Nobody(world))
    base = (1 << 63) - 1  # every chunk at its largest: the largest sums
    if world <= 64:  # summing 65536 headers here would take a while; the exactness below covers it
        assert _verdicts(frame, [(base, 7)] * world) == [True] * world
    own, expected = frame.header(base, 7)
    words = struct.unpack(f"{len(own) // 4}f", own)
    assert max(abs(w) for w in words) * world <= 2**24  # every word of every sum is an exact float32 integer
    assert struct.unpack(f"{len(expected) // 4}f", expected) == tuple(w * world for w in words)


@pytest.mark.unit
def test_fingerprints_that_would_cancel_are_caught_on_every_rank():
    """Three ranks whose chunk values are c-1, c, c+1: their sum is 3c, what the middle rank expects of a
    plain sum; the squares' sum is not 3c², so every rank (the middle one too) sees the mismatch."""
    frame = carried.Frame(_Nobody(3))
    c = 100
    digests = [(c - 2, 5), (c - 1, 5), (c, 5)]  # chunk 0 values c-1, c, c+1 (stored as chunk + 1)
    headers = [frame.header(b, s) for b, s in digests]
    first = [struct.unpack("3f", own[12:24]) for own, _ in headers]  # (c, -c, c²) of chunk 0
    assert sum(w[0] for w in first) == 3 * first[1][0]  # a naive sum would cancel for the middle rank
    assert _verdicts(frame, digests) == [False, False, False]


@pytest.mark.unit
@pytest.mark.parametrize("world", [2, 3, 4])
def test_any_difference_is_seen_by_every_rank(world):
    frame = carried.Frame(_Nobody(world))
    base = 0x5DEECE66D_12345
    for other in (base ^ 1, base ^ (1 << 62), base + (1 << 11)):
        digests = [(base, 9)] * (world - 1) + [(other, 9)]
        assert _verdicts(frame, digests) == [False] * world
    assert _verdicts(frame, [(base, 9)] * (world - 1) + [(base, 10)]) == [False] * world  # seq differs


@pytest.mark.unit
def test_what_rides_in_the_frame():
    import torch

    frame = carried.Frame(_Nobody(2))
    assert carried.can_carry(frame, torch.ones(1024), ReduceOp.SUM)
    assert carried.can_carry(frame, torch.ones(3), ReduceOp.AVG)
    assert not carried.can_carry(frame, torch.ones(1025), ReduceOp.SUM)  # larger: header-only frame, then the op
    assert not carried.can_carry(frame, torch.ones(4), ReduceOp.MAX)  # the frame is always summed
    assert not carried.can_carry(frame, torch.ones(4, dtype=torch.float64), ReduceOp.SUM)
    assert not carried.can_carry(None, torch.ones(4), ReduceOp.SUM)
    assert carried.chunk_bits(65537) == 0  # more ranks: the generic check

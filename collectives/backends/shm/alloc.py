"""The zero-copy allocator of the ``shm`` backend: tensors that live in a shared segment.

``ShmBackend.alloc`` (collective: every rank of the group, same order, same shape and
dtype) maps one new segment holding an equal, page-aligned slice per rank and returns this
rank's slice as a tensor. When every rank's operand of a large op lies in the same
allocation, peers read each other's slices in place and the op skips staging (see
``algorithms``). The memory lives as long as the returned tensor (or a view) does.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence

import torch

from .layout import align
from .segment import HEADER, Segment


class SharedAlloc:
    """One collective allocation: one segment, one equal slice per rank."""

    def __init__(self, ident: int, seg: Segment, stride: int, nbytes: int, rank: int):
        self.id, self.seg, self.stride = ident, seg, stride
        self.u8 = torch.frombuffer(seg.mm, dtype=torch.uint8)
        base = self.u8.data_ptr()
        self.lo = base + HEADER + rank * stride  # this rank's slice, as addresses
        self.hi = self.lo + nbytes

    def peer(self, rank: int, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` of ``rank``'s slice from ``offset``, as uint8."""
        start = HEADER + rank * self.stride + offset
        return self.u8[start : start + nbytes]


class AllocTable:
    """This rank's live allocations of one group, by id (ids agree across ranks: same call order)."""

    def __init__(self):
        self._allocs: dict[int, SharedAlloc] = {}
        self._ids = itertools.count(1)

    def new(
        self, group_segment: Segment, rank: int, world: int, shape, dtype, timeout: float, where: str
    ) -> torch.Tensor:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        stride = align(nbytes)
        ident = next(self._ids)
        seg = Segment.open(
            f"{group_segment.name}.a{ident}",
            rank,
            world,
            HEADER + stride * world,
            timeout,
            creator_pid=group_segment.pid(0) or None,
            where=where,
        )
        alloc = SharedAlloc(ident, seg, stride, nbytes, rank)
        self._allocs[ident] = alloc
        tensor = alloc.peer(rank, 0, nbytes).view(dtype).view(shape)
        # When the caller drops the tensor, forget the alloc: this rank then reports its views as plain
        # (every rank must report the same alloc for zero-copy, so the group falls back consistently),
        # and the memory goes with the last view.
        weakref.finalize(tensor, self._allocs.pop, ident, None)
        return tensor

    def __getitem__(self, ident: int) -> SharedAlloc:
        return self._allocs[ident]

    def locate(self, tensors: Sequence[torch.Tensor]) -> tuple[int, int]:
        """(alloc id, byte offset) when ``tensors`` lie back to back in this rank's slice of an alloc,
        else (0, 0)."""
        if not self._allocs or not tensors:
            return (0, 0)
        ptr = tensors[0].data_ptr()
        end = ptr
        for t in tensors:
            if t.data_ptr() != end:
                return (0, 0)
            end += t.numel() * t.element_size()
        for a in self._allocs.values():
            if a.lo <= ptr and end <= a.hi:
                return (a.id, ptr - a.lo)
        return (0, 0)

    def unlink_all(self) -> None:
        for a in list(self._allocs.values()):
            a.seg.maybe_unlink()

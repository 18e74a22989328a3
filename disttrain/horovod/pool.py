"""Result buffers for large allreduces, reused once the user let go of them.

Why: an out-of-place 64 MiB allreduce spends more time faulting in a fresh output tensor than
moving data, and the ``shm`` backend reduces buffers from ``comm.alloc`` in place across
processes (zero copy) at several times the speed of user memory. So the engine keeps a few
allocated buffers per process set, hands them out as results, and reuses one once nothing
outside the pool refers to its storage any more.

Reuse must be agreed: ``comm.alloc`` is collective, and a buffer may only be overwritten when
it is free on every member. Each cycle every member puts :meth:`free_mask` (bit i: buffer i is
free here) in its row; the engine ANDs the masks, and :meth:`acquire` decides from that mask
and the pool's own history only, so every member picks the same buffer or allocates together.
"""

from __future__ import annotations

import os

import torch

MIN_BYTES = 1 << 20  # smaller allreduces are fused instead
MAX_BUFFERS = 16


def _use_count(t: torch.Tensor) -> int | None:
    counter = getattr(torch._C, "_storage_Use_Count", None)  # private; without it, no reuse
    return None if counter is None else counter(t.untyped_storage()._cdata)


class Pool:
    """Members only, engine thread only (allocation is collective over the set)."""

    def __init__(self, comm):
        self.comm = comm
        # Only buffers the backend maps across processes beat reducing in place in user memory;
        # mirrors Communicator.alloc, which falls back to torch.empty for the other backends.
        self.zero_copy = getattr(comm.backend, "alloc", None) is not None
        self.max_bytes = int(os.environ.get("DISTTRAIN_HVD_POOL_BYTES", 1 << 30))
        self._bufs: list[tuple[tuple[int, torch.dtype], torch.Tensor, int]] = []  # (key, buffer, idle use count)
        self._bytes = 0

    def free_mask(self) -> int:
        mask = 0
        for i, (_, buf, idle) in enumerate(self._bufs):
            if _use_count(buf) == idle:
                mask |= 1 << i
        return mask

    def acquire(self, numel: int, dtype: torch.dtype, agreed_free: int, taken: set[int]) -> torch.Tensor | None:
        """A flat buffer free on every member, or None (then the caller uses its own memory)."""
        if _use_count(torch.empty(0)) is None:
            return None
        for i, (key, buf, _) in enumerate(self._bufs):
            if key == (numel, dtype) and agreed_free >> i & 1 and i not in taken:
                taken.add(i)
                return buf
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if len(self._bufs) >= MAX_BUFFERS or self._bytes + nbytes > self.max_bytes:
            return None
        buf = self.comm.alloc(numel, dtype)  # keep this very tensor: shm forgets an alloc once it is dropped
        self._bufs.append(((numel, dtype), buf, _use_count(buf)))
        self._bytes += nbytes
        taken.add(len(self._bufs) - 1)
        return buf

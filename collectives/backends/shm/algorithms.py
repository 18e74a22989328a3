"""The collective algorithms of the ``shm`` backend, on a group's segment.

Three paths, chosen per op from its size and where its tensors live:

* latency (up to ``SMALL_BYTES``): copy into this rank's staging slot, one sync, every rank
  reduces all slots straight into its own tensor: no allocation, numpy on views made once;
* staged (larger, plain tensors): split the work, rank r reduces part r of everybody's data
  (reduce-scatter), then every rank copies the other parts (allgather), pipelined through
  the two staging slots in chunks of ``STAGING_SLOT_BYTES``;
* zero copy (every rank's operand in one ``alloc``): peers read each other's buffers in
  place: for an allreduce rank r reduces part r of every buffer and writes the result into
  every peer's part r (one read of N bytes plus a write of N bytes per rank, plus the
  reduction), between the arrival and one more sync.

Staging slots alternate per round, so a round needs one sync: a rank writing slot k+1
cannot overwrite what a slower peer still reads from slot k. Who calls: ``ShmBackend``, one
op at a time per group.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np
import torch

from ...fingerprint import Fingerprint
from ...types import ReduceOp
from .alloc import AllocTable
from .kernels import NUMPY_DTYPES, as_bytes, combine, numpy_reducer, reduce_numpy, reduce_rows, split_range
from .layout import RECORD_ALLOC, SMALL_BYTES, STAGING_SLOT_BYTES, Layout
from .sync import StepSync

_MAX_ARRAYS = 2048  # plans and views of recent small operands (under a KiB each; a plan per staging slot)


def _numpy_reduces(dtype: torch.dtype, op: ReduceOp, world: int) -> bool:
    """Whether the numpy latency path reduces ``dtype`` as the torch kernels do: fp16 accumulates
    in fp32 there (the same result only for a pair), and integer AVG truncates (numpy's divide
    cannot write integers)."""
    if dtype not in NUMPY_DTYPES:
        return False
    if dtype is torch.float16:
        return world == 2
    return dtype.is_floating_point or op is not ReduceOp.AVG


def _address_key(head: list, tensors: Sequence[torch.Tensor]) -> tuple:
    """``head`` followed by each tensor's address and size: the key of a plan of views of those tensors."""
    for t in tensors:
        head.append(t.data_ptr())
        head.append(t.nbytes)
    return tuple(head)


def _at(ptr: int, nbytes: int) -> np.ndarray:
    """A writable uint8 numpy array over ``nbytes`` at address ``ptr`` (no reference to their owner)."""
    if nbytes == 0:
        return np.empty(0, np.uint8)
    return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), np.uint8)


class Algorithms:
    """Every collective of one group, run synchronously on the calling thread. Operands are contiguous
    (the communicator's contract: it hands a contiguous copy of anything else and copies back)."""

    def __init__(self, sync: StepSync, layout: Layout, u8: torch.Tensor, allocs: AllocTable):
        self.sync, self.allocs = sync, allocs
        self.rank, self.world = sync.rank, layout.world
        self.stage = u8[layout.staging : layout.mailboxes].view(self.world, 2, STAGING_SLOT_BYTES)
        self._typed: dict = {}  # (slot, dtype[, "np"]) -> view of every rank's slot
        self._rounds = 0  # staging rounds issued (parity picks the slot)
        # numpy views of recent small operands (and small allgathers' copy plans), by address: making one costs
        # more than the work. A view is made from the address, not with ``Tensor.numpy()`` (which marks the
        # caller's storage non-resizable for good: ZeRO-3 frees gathered parameters by resizing theirs) and
        # holds no reference; it is only used while a live operand occupies exactly that memory, so a freed
        # and reused address simply maps the new operand (at most _MAX_ARRAYS entries of at most SMALL_BYTES).
        self._arrays: dict = {}

    # -- staging ---------------------------------------------------------------------------
    def _next_slot(self) -> int:
        self._rounds += 1
        return self._rounds & 1

    def _rows(self, slot: int, dtype: torch.dtype) -> torch.Tensor:
        key = (slot, dtype)
        rows = self._typed.get(key)
        if rows is None:
            rows = self._typed[key] = self.stage[:, slot, :].view(dtype)
        return rows

    def _np_rows(self, slot: int, dtype: torch.dtype | None):
        """Every rank's staging slot as numpy rows of ``dtype`` (None: bytes)."""
        key = (slot, dtype, "np")
        rows = self._typed.get(key)
        if rows is None:
            rows = self.stage[:, slot, :].numpy()
            rows = self._typed[key] = rows if dtype is None else rows.view(NUMPY_DTYPES[dtype])
        return rows

    def _cached(self, key: tuple, make):
        a = self._arrays.get(key)
        if a is None:
            if len(self._arrays) >= _MAX_ARRAYS:
                self._arrays.clear()
            a = self._arrays[key] = make()
        return a

    def _np_typed(self, t: torch.Tensor):
        """A flat numpy view of small contiguous ``t`` (a ``NUMPY_DTYPES`` dtype), cached by address."""
        ptr, n = t.data_ptr(), t.nbytes
        return self._cached((ptr, n, t.dtype), lambda: _at(ptr, n).view(NUMPY_DTYPES[t.dtype]))

    def _reduce_plan(self, slot: int, t: torch.Tensor, op: ReduceOp):
        """A small allreduce's numpy views: (operand, this rank's staging row, reducer); False when numpy does
        not reduce ``t``'s dtype like torch."""
        if not _numpy_reduces(t.dtype, op, self.world):
            return False
        a = self._np_typed(t)
        rows = self._np_rows(slot, t.dtype)[:, : a.shape[0]]
        return a, rows[self.rank], numpy_reducer(rows, op)

    def _shared(self, base: int):
        """The alloc every rank's operand lies in, with each rank's offset; or (None, None)."""
        offsets = self.sync.zero_copy_offsets(base)
        if offsets is None:
            return None, None
        return self.allocs[self.sync.record(self.rank, base, RECORD_ALLOC)], offsets

    def close(self) -> None:
        self.stage = None
        self._typed, self._arrays = {}, {}

    # -- collectives -----------------------------------------------------------------------
    def allreduce(self, t: torch.Tensor, op: ReduceOp, fp: Fingerprint | None) -> None:
        world, nbytes, sync = self.world, t.nbytes, self.sync
        if world == 1:
            sync.arrive(fp, nbytes)
            return
        if nbytes <= SMALL_BYTES:
            # Latency path in numpy (a third of torch's per-call overhead); fp16 pairs round once either way.
            # Its views are built once per (slot, operand, op): building them costs more than the copies.
            slot = self._rounds + 1 & 1
            key = (slot, t.data_ptr(), nbytes, t.dtype, op)
            plan = self._arrays.get(key)
            if plan is None:
                plan = self._cached(key, lambda: self._reduce_plan(slot, t, op))
            if plan:
                self._rounds += 1
                a, row, reducer = plan
                row[...] = a
                sync.arrive(fp, nbytes)
                reduce_numpy(reducer, a)
                return
        flat = t.view(-1)
        if nbytes <= SMALL_BYTES:
            rows = self._rows(self._next_slot(), t.dtype)
            n = flat.numel()
            rows[self.rank, :n].copy_(flat)
            sync.arrive(fp, nbytes)
            reduce_rows(rows[:, :n], flat, op, world)
            return
        base = sync.arrive(fp, nbytes, self.allocs.locate([t]))
        alloc, offsets = self._shared(base)
        if alloc is not None:
            views = [alloc.peer(j, offsets[j], nbytes).view(t.dtype) for j in range(world)]
            parts = split_range(flat.numel(), world)
            lo, hi = parts[self.rank]
            mine = views[self.rank]
            others = [views[j][lo:hi] for j in range(world) if j != self.rank]
            combine([mine[lo:hi], *others], mine[lo:hi], op, world)
            # Push our part into every peer's buffer rather than pull theirs after a second sync: between
            # the arrival and the last sync, rank j reads and writes part j alone of every buffer, so the
            # pushes race with nothing, and the op costs two syncs instead of three (the same bytes moved).
            if hi > lo:
                for j in range(world):
                    if j != self.rank:
                        views[j][lo:hi].copy_(mine[lo:hi])
            sync.advance(fp)  # every part is in every buffer, and no peer touches ours after this: return
            return
        chunk = STAGING_SLOT_BYTES // t.element_size()
        for start in range(0, flat.numel(), chunk):
            piece = flat[start : start + chunk]
            n = piece.numel()
            rows = self._rows(self._next_slot(), t.dtype)
            rows[self.rank, :n].copy_(piece)
            sync.advance(fp)
            parts = split_range(n, world)
            lo, hi = parts[self.rank]
            if hi > lo:
                others = [rows[j, lo:hi] for j in range(world) if j != self.rank]
                combine([rows[self.rank, lo:hi], *others], rows[self.rank, lo:hi], op, world)
            sync.advance(fp)
            for j, (a, b) in enumerate(parts):
                if b > a:
                    piece[a:b].copy_(rows[j, a:b])

    def broadcast(self, t: torch.Tensor, src: int, fp: Fingerprint | None) -> None:
        nbytes, root, sync = t.nbytes, self.rank == src, self.sync
        if nbytes <= SMALL_BYTES:  # latency path: numpy views of the operand and the root's slot, made once
            slot = self._rounds + 1 & 1
            key = (slot, t.data_ptr(), nbytes, src, "bcast")
            plan = self._arrays.get(key)
            if plan is None:
                plan = self._cached(key, lambda: (_at(t.data_ptr(), nbytes), self._np_rows(slot, None)[src, :nbytes]))
            self._rounds += 1
            mine, row = plan
            if root:
                row[...] = mine
            sync.arrive(fp, nbytes)
            if not root:
                mine[...] = row
            return
        data = as_bytes(t)
        if nbytes <= STAGING_SLOT_BYTES:
            slot = self._next_slot()
            if root:
                self.stage[src, slot, :nbytes].copy_(data)
            sync.arrive(fp, nbytes)
            if not root:
                data.copy_(self.stage[src, slot, :nbytes])
            return
        base = sync.arrive(fp, nbytes, self.allocs.locate([t]))
        alloc, offsets = self._shared(base)
        if alloc is not None:
            if not root:
                data.copy_(alloc.peer(src, offsets[src], nbytes))
            sync.advance(fp)
            return
        for start in range(0, nbytes, STAGING_SLOT_BYTES):
            n = min(STAGING_SLOT_BYTES, nbytes - start)
            slot = self._next_slot()
            if root:
                self.stage[src, slot, :n].copy_(data[start : start + n])
            sync.advance(fp)
            if not root:
                data[start : start + n].copy_(self.stage[src, slot, :n])

    def _gather_plan(self, slot: int, outputs: list[torch.Tensor], t: torch.Tensor):
        """A small allgather's copies as prebuilt numpy views: (this rank's staging row and input, the
        largest output, [(output, source)]); False when an output is too large for the latency path."""
        sizes = [o.nbytes for o in outputs]
        if max(sizes) > SMALL_BYTES:
            return False
        stage, mine = self._np_rows(slot, None), _at(t.data_ptr(), t.nbytes)
        pairs = [
            (_at(o.data_ptr(), n), mine if j == self.rank else stage[j, :n])
            for j, (o, n) in enumerate(zip(outputs, sizes))
        ]
        return stage[self.rank, : t.nbytes], mine, max(sizes), pairs

    def allgather(self, outputs: Sequence[torch.Tensor], t: torch.Tensor, fp: Fingerprint | None) -> None:
        world, r, sync = self.world, self.rank, self.sync
        if t.nbytes <= SMALL_BYTES:
            # Latency path: every copy on a numpy view made once per (slot, operand addresses), one sync.
            slot = self._next_slot()
            key = _address_key([slot, t.data_ptr(), t.nbytes], outputs)
            plan = self._arrays.get(key)
            if plan is None:
                plan = self._cached(key, lambda: self._gather_plan(slot, outputs, t))
            if plan:
                row, mine, biggest, pairs = plan
                row[...] = mine
                sync.arrive(fp, biggest)
                for dst, src in pairs:
                    dst[...] = src
                return
            self._rounds -= 1  # the slot was not used
        outs = [as_bytes(o) for o in outputs]
        sizes = [o.numel() for o in outs]
        data = as_bytes(t)
        biggest = max(sizes)
        if biggest <= STAGING_SLOT_BYTES:
            slot = self._next_slot()
            self.stage[r, slot, : sizes[r]].copy_(data)
            sync.arrive(fp, biggest)
            for j in range(world):
                outs[j].copy_(data if j == r else self.stage[j, slot, : sizes[j]])
            return
        base = sync.arrive(fp, biggest, self.allocs.locate([t]))
        alloc, offsets = self._shared(base)
        if alloc is not None:
            for j in range(world):
                outs[j].copy_(data if j == r else alloc.peer(j, offsets[j], sizes[j]))
            sync.advance(fp)
            return
        outs[r].copy_(data)
        for start in range(0, biggest, STAGING_SLOT_BYTES):
            slot = self._next_slot()
            mine = data[start : start + STAGING_SLOT_BYTES]
            self.stage[r, slot, : mine.numel()].copy_(mine)
            sync.advance(fp)
            for j in range(world):
                if j != r and sizes[j] > start:
                    n = min(STAGING_SLOT_BYTES, sizes[j] - start)
                    outs[j][start : start + n].copy_(self.stage[j, slot, :n])

    def _scatter_plan(self, slot: int, out: torch.Tensor, inputs: Sequence[torch.Tensor], op: ReduceOp):
        """A small reduce_scatter's numpy views: ([(staging part, input)], bytes staged, the output or None (an
        empty part), reducer of this rank's part); False past SMALL_BYTES or when numpy does not reduce the
        dtype like torch. Inputs that follow each other in memory are staged with one copy."""
        counts = [i.numel() for i in inputs]
        total, size, r = sum(counts), out.element_size(), self.rank
        if total * size > SMALL_BYTES or not _numpy_reduces(out.dtype, op, self.world):
            return False
        dtype = NUMPY_DTYPES[out.dtype]
        rows = self._np_rows(slot, out.dtype)
        ptrs = [i.data_ptr() for i in inputs]
        if total and all(ptrs[j + 1] == ptrs[j] + inputs[j].nbytes for j in range(len(inputs) - 1)):
            copies = [(rows[r, :total], _at(ptrs[0], total * size).view(dtype))]
        else:
            copies, pos = [], 0
            for p, n in zip(ptrs, counts):
                if n:
                    copies.append((rows[r, pos : pos + n], _at(p, n * size).view(dtype)))
                pos += n
        lo = sum(counts[:r])
        outv = _at(out.data_ptr(), out.nbytes).view(dtype) if counts[r] else None
        return copies, total * size, outv, numpy_reducer(rows[:, lo : lo + counts[r]], op)

    def reduce_scatter(self, out: torch.Tensor, inputs: Sequence[torch.Tensor], op: ReduceOp, fp) -> None:
        world, r, size, sync = self.world, self.rank, out.element_size(), self.sync
        # Latency path: every input into this rank's staging row, one sync, reduce our part in numpy, on views
        # made once per (slot, output, inputs, op).
        slot = self._rounds + 1 & 1
        key = _address_key([slot, out.data_ptr(), out.nbytes, out.dtype, op], inputs)
        plan = self._arrays.get(key)
        if plan is None:
            plan = self._cached(key, lambda: self._scatter_plan(slot, out, inputs, op))
        if plan:
            self._rounds += 1
            copies, staged, outv, reducer = plan
            for dst, src in copies:
                dst[...] = src
            sync.arrive(fp, staged)
            if outv is not None:
                reduce_numpy(reducer, outv)
            return
        counts = [i.numel() for i in inputs]
        total = sum(counts)
        my_lo = sum(counts[:r])
        my_hi = my_lo + counts[r]
        flat_out = out.view(-1)
        base = sync.arrive(fp, total * size, self.allocs.locate(inputs) if total * size > SMALL_BYTES else (0, 0))
        alloc, offsets = self._shared(base)
        if alloc is not None:
            lo, n = my_lo * size, counts[r] * size
            srcs = [alloc.peer(j, offsets[j] + lo, n).view(out.dtype) for j in range(world)]
            if n:
                combine([srcs[r]] + [s for j, s in enumerate(srcs) if j != r], flat_out, op, world)
            sync.advance(fp)
            return
        chunk = STAGING_SLOT_BYTES // size
        for start in range(0, total, chunk):
            end = min(total, start + chunk)
            rows = self._rows(self._next_slot(), out.dtype)
            pos = 0
            for t in inputs:  # copy the part of the concatenation that falls in [start, end)
                a, b = max(pos, start), min(pos + t.numel(), end)
                if b > a:
                    rows[r, a - start : b - start].copy_(t.view(-1)[a - pos : b - pos])
                pos += t.numel()
            sync.advance(fp)
            a, b = max(my_lo, start), min(my_hi, end)
            if b > a:
                reduce_rows(rows[:, a - start : b - start], flat_out[a - my_lo : b - my_lo], op, world)

    def all_to_all(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], fp) -> None:
        world, r, sync = self.world, self.rank, self.sync
        ins, outs = [as_bytes(i) for i in inputs], [as_bytes(o) for o in outputs]
        outs[r].copy_(ins[r])
        base = sync.arrive(fp, max(x.numel() for x in ins + outs))
        biggest = sync.largest(base)
        part = STAGING_SLOT_BYTES // world // 64 * 64  # each slot holds one part per destination
        for start in range(0, biggest, part):
            slot = self._next_slot()
            for j in range(world):
                piece = ins[j][start : start + part]
                if j != r and piece.numel():
                    self.stage[r, slot, j * part : j * part + piece.numel()].copy_(piece)
            sync.advance(fp)
            for j in range(world):
                piece = outs[j][start : start + part]
                if j != r and piece.numel():
                    piece.copy_(self.stage[j, slot, r * part : r * part + piece.numel()])

    def barrier(self, fp: Fingerprint | None) -> None:
        self.sync.arrive(fp)

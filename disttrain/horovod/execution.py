"""Running agreed ops on a process set's data communicator, with Horovod's tensor fusion.

Called only by the set's engine thread, with the ready list of one cycle (identical on every
member, see ``negotiation``). Allreduces that share a fusion key (dtype, reduce op, scale
factors) are packed, in agreed order, into buffers of at most ``HOROVOD_FUSION_THRESHOLD``
bytes and reduced as one transfer each; a tensor larger than the threshold goes alone, and
an in-place allreduce alone in its buffer is reduced where it lies (no copy). A rank that
called ``join()`` has no tensor for the ops it is answering: it contributes zeros of the size
the others announced (``aux``). Every other kind runs one op at a time in agreed order.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from collectives import Communicator
from collectives import ReduceOp as CommOp

from . import adasum
from .exceptions import HorovodError
from .handles import Handle
from .negotiation import Announcement, Ready
from .pool import MIN_BYTES, Pool
from .wire import SHARED, Kind, scale_, split_key

# An allreduce this large runs alone: copying it into and out of a fusion buffer costs more than
# the collective's latency that fusing would save (decided from agreed sizes: the same everywhere).
ALONE_BYTES = 256 << 10
_COMM_OPS = (CommOp.AVG, CommOp.SUM, None, CommOp.MIN, CommOp.MAX, CommOp.PROD)  # by hvd.ReduceOp value


@dataclasses.dataclass(eq=False)
class Op:
    """One op submitted on this rank: what it announces, and what the engine needs to run it."""

    name: str
    kind: Kind
    ann: Announcement
    description: str
    handle: Handle
    tensor: torch.Tensor | None = None  # the input, on the wire (contiguous, widened)
    output: torch.Tensor | None = None  # in-place target (the user's tensor), written by the engine
    pre: float = 1.0
    post: float = 1.0
    int_average: bool = False  # integer Average: a sum, then truncating division
    root: int = 0  # broadcast: set rank of the root
    splits: list[int] | None = None  # alltoall: rows per destination
    action: Callable[[], object] | None = None  # PROCESS_SET: runs on the engine thread
    t_submit: float = dataclasses.field(default_factory=time.perf_counter)
    t_agreed: float = 0.0
    cache: str = ""  # why the response cache missed this op ("" on a hit), for the timeline


def _comm_op(fuse: int) -> CommOp:
    return _COMM_OPS[split_key(fuse)[2]]


def _deliver(op: Op, value: torch.Tensor) -> None:
    """Write an in-place result into the user's tensor (here, so a completed handle means a
    written tensor), then complete the handle."""
    if op.output is not None:
        if value.data_ptr() != op.output.data_ptr():
            op.output.copy_(value.view(op.output.shape))
        value = op.output
    op.handle.complete(value)


def run_ready(
    ready: list[Ready],
    mine: dict[int, Op],
    comm: Communicator | None,
    fusion_bytes: int,
    pool: Pool | None = None,
    agreed_free: int = 0,
) -> None:
    """Run one cycle's ready list, completing the handles of this rank's ops. ``mine`` maps name
    digests to this rank's ops (absent for the ops this rank answers after join()). A transport
    error propagates: the set's communicators are then out of step, and the engine stops the set."""
    size = comm.world_size if comm is not None else 1
    done: set[int] = set()
    taken: set[int] = set()  # pool buffers handed out in this cycle
    for i, r in enumerate(ready):
        if r.name in done:
            continue
        if r.kind is Kind.ALLREDUCE:
            bucket, nbytes = [], 0
            dtype = split_key(r.fuse)[1]
            item = torch.empty((), dtype=dtype).element_size()
            for r2 in ready[i:]:
                if r2.name in done or r2.fuse != r.fuse:
                    continue
                b = _numel(r2) * item
                if bucket and (nbytes + b > fusion_bytes or max(b, nbytes) >= ALONE_BYTES or r.fuse & SHARED):
                    continue
                bucket.append(r2)
                nbytes += b
                done.add(r2.name)
            _allreduce(bucket, mine, comm, size, pool, agreed_free, taken)
        else:
            done.add(r.name)
            op = mine.get(r.name)
            if r.kind is Kind.BARRIER:
                if op is not None:
                    op.handle.complete(None)
            elif r.kind is Kind.ADASUM:
                _adasum(r, op, comm)
            else:
                _RUN[r.kind](r, op, comm)


def _numel(r: Ready) -> int:
    return next(a for a in r.aux if a is not None)


def _allreduce(bucket: list[Ready], mine: dict[int, Op], comm, size: int, pool, agreed_free: int, taken) -> None:
    first = bucket[0]
    dtype = split_key(first.fuse)[1]
    ops = [mine.get(r.name) for r in bucket]
    lead = next((o for o in ops if o is not None), None)
    pre, post = (lead.pre, lead.post) if lead is not None else (1.0, 1.0)
    n0 = _numel(first)
    pooled = None
    big = n0 * torch.empty((), dtype=dtype).element_size() >= MIN_BYTES
    # Out of place: a reused result buffer saves faulting in a fresh one (any backend). In place:
    # worth the two copies only where the pool's buffers are reduced zero-copy. Members may differ
    # in ``in_place`` only where allocation is local (not zero_copy), and a buffer is reused only
    # when this member's own bit in the agreed mask says it is free here, so that is safe.
    in_place = lead is not None and lead.output is not None
    if first.fuse & SHARED:  # a persistent buffer from comm.alloc on every member: reduce where it lies
        buf = ops[0].output.view(-1) if ops[0] is not None else torch.zeros(n0, dtype=dtype)
    elif len(bucket) == 1 and pool is not None and big and (pool.zero_copy or not in_place):
        pooled = pool.acquire(n0, dtype, agreed_free, taken)  # the same answer on every member
    if first.fuse & SHARED:
        pass
    elif pooled is not None:
        buf = pooled
        if ops[0] is not None:
            buf.copy_(ops[0].tensor.view(-1))
        else:
            buf.zero_()
    elif len(bucket) == 1 and ops[0] is not None and _reduce_in_output(ops[0], dtype):
        buf = ops[0].output.view(-1)  # in place, alone: reduce where it lies
        if ops[0].tensor.data_ptr() != buf.data_ptr():
            buf.copy_(ops[0].tensor.view(-1))
    elif len(bucket) == 1 and ops[0] is not None:
        buf = ops[0].tensor.reshape(-1).clone()
    else:
        total = sum(_numel(r) for r in bucket)
        if pool is not None and pool.zero_copy and total * torch.empty((), dtype=dtype).element_size() >= MIN_BYTES:
            pooled = pool.acquire(total, dtype, agreed_free, taken)  # a fusion buffer reduced zero-copy
        buf = pooled if pooled is not None else torch.empty(total, dtype=dtype)
        off = 0
        for r, op in zip(bucket, ops):
            n = _numel(r)
            if op is None:
                buf[off : off + n].zero_()
            else:
                buf[off : off + n].copy_(op.tensor.view(-1))
            off += n
    if len(bucket) == 1 and ops[0] is None and pooled is None:
        buf.zero_()
    scale_(buf, pre)
    if comm is not None and size > 1:
        cop = _comm_op(first.fuse)
        int_avg = cop is CommOp.AVG and not dtype.is_floating_point
        comm.allreduce(buf, CommOp.SUM if int_avg else cop)
        if int_avg:
            buf.div_(size, rounding_mode="trunc")
    scale_(buf, post)
    off = 0
    for r, op in zip(bucket, ops):
        n = _numel(r)
        if op is not None:
            _deliver(op, buf[off : off + n].view(op.tensor.shape))
        off += n


def _reduce_in_output(op: Op, dtype: torch.dtype) -> bool:
    return op.output is not None and op.output.dtype == dtype and op.output.is_contiguous()


def _adasum(r: Ready, op: Op | None, comm) -> None:
    n = _numel(r)
    flat = op.tensor.reshape(-1).to(torch.float64) if op is not None else torch.zeros(n, dtype=torch.float64)
    size = comm.world_size if comm is not None else 1
    out = torch.empty(size, n, dtype=torch.float64)
    if size > 1:
        comm.allgather(list(out.unbind(0)), flat)
    else:
        out[0].copy_(flat)
    if op is not None:
        _deliver(op, adasum.tree(list(out.unbind(0))).to(op.tensor.dtype).view(op.tensor.shape))


def _allgather(r: Ready, op: Op | None, comm) -> None:
    dims = [a or 0 for a in r.aux]
    t = op.tensor
    out = torch.empty((sum(dims), *t.shape[1:]), dtype=t.dtype)
    if comm is not None and comm.world_size > 1:
        comm.allgather(list(out.split(dims)), t)
    else:
        out.copy_(t)
    op.handle.complete(out)


def _broadcast(r: Ready, op: Op | None, comm) -> None:
    buf = op.output if op.output is not None and op.output.dtype == op.tensor.dtype else op.tensor.clone()
    if buf.data_ptr() != op.tensor.data_ptr():
        buf.copy_(op.tensor)
    if comm is not None and comm.world_size > 1:
        comm.broadcast(buf, op.root)
    _deliver(op, buf)


def _alltoall(r: Ready, op: Op | None, comm) -> None:
    t, W = op.tensor, (comm.world_size if comm is not None else 1)
    mat = torch.empty(W, W, dtype=torch.int64)
    mine = torch.tensor(op.splits, dtype=torch.int64)
    if W > 1:
        comm.allgather(list(mat.unbind(0)), mine)
    else:
        mat[0].copy_(mine)
    me = comm.rank if comm is not None else 0
    recv = [int(mat[src, me]) for src in range(W)]
    out = torch.empty((sum(recv), *t.shape[1:]), dtype=t.dtype)
    if W > 1:
        comm.all_to_all(list(out.split(recv)), list(t.split(op.splits)))
    else:
        out.copy_(t)
    op.handle.complete((out, torch.tensor(recv, dtype=torch.int32)))


def _reducescatter(r: Ready, op: Op | None, comm) -> None:
    t, W = op.tensor, (comm.world_size if comm is not None else 1)
    me = comm.rank if comm is not None else 0
    rows = t.shape[0]
    counts = [rows // W + (1 if k < rows % W else 0) for k in range(W)]  # Horovod's split rule
    src = scale_(t.clone(), op.pre) if op.pre != 1.0 else t
    out = torch.empty((counts[me], *t.shape[1:]), dtype=t.dtype)
    cop = _comm_op(r.fuse)
    int_avg = cop is CommOp.AVG and not t.is_floating_point()
    if W > 1:
        comm.reduce_scatter(out, list(src.split(counts)), CommOp.SUM if int_avg else cop)
    else:
        out.copy_(src)
    if int_avg:
        out.div_(W, rounding_mode="trunc")
    scale_(out, op.post)
    op.handle.complete(out)


def _process_set(r: Ready, op: Op | None, comm) -> None:
    try:
        value = op.action()
    except HorovodError as exc:  # decided from state every rank shares: fails alike everywhere
        op.handle.fail(exc)
        return
    op.handle.complete(value)


_RUN = {
    Kind.ALLGATHER: _allgather,
    Kind.BROADCAST: _broadcast,
    Kind.ALLTOALL: _alltoall,
    Kind.REDUCESCATTER: _reducescatter,
    Kind.PROCESS_SET: _process_set,
}

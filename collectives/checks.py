"""The generic cross-rank check, for backends that do not check inline.

Why this design: the check must detect a mismatch on *every* rank and must itself never
mismatch, so it is one fixed-shape collective that every rank issues before its op,
whatever the op: an in-place allreduce (MAX) of two int64, the 63-bit digest of the
fingerprint (which covers the sequence number) and its negation, through the backend
itself: all ranks agree iff every rank gets back its own digest for both. All ranks then
hold the same extremes and reach the same verdict. Only on a mismatch do they exchange the full 512-byte fingerprints
(a second fixed-shape allgather) so the error can name both sides. Because the op
itself never started, the group stays usable after a :class:`CollectiveMismatchError`.

Point-to-point ops cannot use a group collective (only two ranks take part, and a
reply from the receiver would turn every send into a rendezvous and deadlock the usual
"both send, then both receive" pattern). So the sender ships its encoded fingerprint as
a small message ahead of the payload and the receiver compares; a p2p mismatch raises
on the receiving rank, and the sender learns of it through its next op (peer gone).

A rank that never arrives shows up as a timeout; :func:`missing_ranks` then asks the
job's store which ranks timed out at the same call, so the error can name the others.
Cost: one extra small collective per op. On the CPU, ``collectives.carried`` replaces it: a fixed-size
frame that small allreduces ride in, and that the other ops send before they start.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Sequence

import torch

from .backend import Backend
from .errors import CollectivesError
from .fingerprint import ENCODED_SIZE, Fingerprint, mismatch_error
from .types import ReduceOp

CHECK_TAG = 32700  # p2p fingerprint messages; user tags must stay below it (MPI's TAG_UB is >= 32767)


def check_collective(backend: Backend, fp: Fingerprint, timeout: float) -> None:
    """Every rank of the group, before the op; blocks until all arrive. Raises on mismatch."""
    world = backend.world_size
    if world == 1:
        return
    dev = backend.device or "cpu"  # nccl (and torch on cuda) move device memory only
    d = fp.digest()
    # One in-place allreduce of two int64: max(d) == d and max(-d) == -d on every rank iff all d agree.
    if dev == "cpu":  # a buffer per backend and thread, filled and read through numpy (no new tensor per op)
        both, view = _cpu_buffer(backend)
        view[0], view[1] = d, -d
        backend.allreduce(both, ReduceOp.MAX).wait(timeout)
        hi, neg_lo = int(view[0]), int(view[1])
    else:
        both = torch.tensor([d, -d], dtype=torch.int64, device=dev)
        backend.allreduce(both, ReduceOp.MAX).wait(timeout)
        hi, neg_lo = both.tolist()
    if hi == d and neg_lo == -d:
        return
    # Every rank saw the same extremes, and at least one differs from its own digest, so every
    # rank takes this branch: exchange full fingerprints to name both sides.
    raise_mismatch(backend, fp, timeout)


def raise_mismatch(backend: Backend, fp: Fingerprint, timeout: float) -> None:
    """Every rank of the group, once all have seen that their fingerprints differ: exchange the full
    fingerprints (one fixed-shape allgather) and raise the error naming this rank's and another's side."""
    world, dev, d = backend.world_size, backend.device or "cpu", fp.digest()
    raw = torch.frombuffer(bytearray(fp.encode()), dtype=torch.uint8).to(dev)
    full = [torch.empty(ENCODED_SIZE, dtype=torch.uint8, device=dev) for _ in range(world)]
    backend.allgather(full, raw).wait(timeout)
    theirs = [Fingerprint.decode(bytes(t.cpu().numpy())) for t in full]
    other = next((f for f in theirs if f.digest() != d and f.rank != fp.rank), theirs[0])
    raise mismatch_error(fp, other)


class _PerThread(threading.local):
    def __init__(self):
        self.buffers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # backend -> (tensor, numpy view)


_local = _PerThread()


def _cpu_buffer(backend: Backend):
    buffers = _local.buffers
    pair = buffers.get(backend)
    if pair is None:
        both = torch.zeros(2, dtype=torch.int64)
        pair = buffers[backend] = (both, both.numpy())  # our own tensor: .numpy() pinning its size is fine
    return pair


def send_fingerprint(backend: Backend, fp: Fingerprint, dst: int):
    """Sender side of a p2p check: post the encoded fingerprint ahead of the payload."""
    dev = backend.device or "cpu"
    raw = torch.frombuffer(bytearray(fp.encode()), dtype=torch.uint8).to(dev)
    return backend.send(raw, dst, CHECK_TAG)


def post_recv_fingerprint(backend: Backend, src: int):
    buf = torch.empty(ENCODED_SIZE, dtype=torch.uint8, device=backend.device or "cpu")
    return buf, backend.recv(buf, src, CHECK_TAG)


def verify_received(fp: Fingerprint, buf: torch.Tensor) -> None:
    theirs = Fingerprint.decode(bytes(buf.cpu().numpy()))
    if theirs.digest() != fp.digest():
        raise mismatch_error(fp, theirs)


def missing_ranks(store, call: str, rank: int, members: Sequence[int], grace: float = 2.0) -> list[int] | None:
    """After a timeout: mark this rank as arrived at ``call`` (group/seq) and return who did not.

    Every rank that timed out at the same call marks itself, so after a short grace the
    unmarked ranks are the ones that never arrived. Returns None without a store.
    """
    if store is None:
        return None
    prefix = f"collectives/arrived/{call}/"
    try:
        store.set(prefix + str(rank), b"1")
        keys = [prefix + str(r) for r in members]
        deadline = time.monotonic() + grace
        while True:
            present = [store.check([k]) for k in keys]
            if all(present) or time.monotonic() > deadline:
                return [r for r, ok in zip(members, present) if not ok]
            time.sleep(0.05)
    except Exception as exc:  # the store itself may be gone with the peer that hosted it
        raise CollectivesError(f"could not reach the job store to find missing ranks: {exc}") from None

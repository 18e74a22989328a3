"""Point-to-point mailboxes of the ``shm`` backend.

Each ordered pair (src, dst) owns a ring of ``MAILBOX_SLOTS`` chunks (see ``layout``)
and a pair record: ``SENT`` (written by src only), ``TAKEN`` (by dst only), then per slot
(tag, message bytes, dtype code, fingerprint digest). A send completes once its last chunk
is in the ring (buffered up to ``MAILBOX_SLOTS`` chunks per pair), so a matching receive
needn't be posted yet. Messages between a pair are matched in order; the receiver checks
tag, size, dtype and digest of the next message against what it expects and raises
:class:`CollectiveMismatchError` otherwise (sender and receiver digests agree by design).

Who calls: ``ShmBackend.send``/``recv``, on the caller's thread or on the group's send or
receive worker thread (one each, so a pair of async exchanges cannot deadlock).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import torch

from ...errors import CollectiveMismatchError, CollectiveTimeoutError
from ...fingerprint import Fingerprint
from .futex import FUTEX
from .kernels import WIRE_DTYPES, as_bytes
from .layout import MAILBOX_SLOTS, Layout
from .sync import SPIN, WORKER_SPIN, StepSync

_SENT, _TAKEN, _SLOTS = 0, 1, 2  # int64 indices in a pair record; slot records are 4 int64 each
_RECEIVER_SLEEPS, _SENDER_SLEEPS = 2 + 4 * MAILBOX_SLOTS, 3 + 4 * MAILBOX_SLOTS  # flags of a futex sleeper


class Mailboxes:
    """The rings and counters this rank sends through and receives from."""

    def __init__(self, sync: StepSync, layout: Layout, u8: torch.Tensor):
        self._sync, self._layout, self._u8 = sync, layout, u8
        self._futex, self._addr = FUTEX, u8.data_ptr()
        self._ctrl, self._rank, self._chunk = sync.ctrl, sync.rank, layout.mailbox_bytes
        self._sent = [0] * layout.world  # messages chunks this rank put in each ring
        self._taken = [0] * layout.world  # chunks this rank took from each ring

    def _ring(self, src: int, dst: int, slot: int, n: int) -> torch.Tensor:
        off = self._layout.mailbox(src, dst, slot)
        return self._u8[off : off + n]

    def send(self, t: torch.Tensor, dst: int, tag: int, fp: Fingerprint | None, timeout: float) -> None:
        ctrl, pair, data = self._ctrl, self._layout.pair(self._rank, dst), as_bytes(t)
        nbytes = data.numel()
        for start in range(0, max(nbytes, 1), self._chunk):
            idx = self._sent[dst]
            self._wait(
                lambda idx=idx: idx - ctrl[pair + _TAKEN] < MAILBOX_SLOTS,
                pair + _TAKEN,
                pair + _SENDER_SLEEPS,
                dst,
                fp,
                "send to",
                tag,
                timeout,
            )
            slot = idx % MAILBOX_SLOTS
            piece = data[start : start + self._chunk]
            self._ring(self._rank, dst, slot, piece.numel()).copy_(piece)
            rec = pair + _SLOTS + 4 * slot
            ctrl[rec], ctrl[rec + 1], ctrl[rec + 2] = tag, nbytes, WIRE_DTYPES.index(t.dtype)
            ctrl[rec + 3] = fp.digest() if fp else 0
            self._sent[dst] = idx + 1
            ctrl[pair + _SENT] = idx + 1  # publish: the chunk and its record are written
            self._wake(pair + _SENT, pair + _RECEIVER_SLEEPS)

    def recv(self, t: torch.Tensor, src: int, tag: int, fp: Fingerprint | None, timeout: float) -> None:
        ctrl, pair, data = self._ctrl, self._layout.pair(src, self._rank), as_bytes(t)
        nbytes = data.numel()
        for start in range(0, max(nbytes, 1), self._chunk):
            idx = self._taken[src]
            self._wait(
                lambda idx=idx: ctrl[pair + _SENT] > idx,
                pair + _SENT,
                pair + _RECEIVER_SLEEPS,
                src,
                fp,
                "recv from",
                tag,
                timeout,
            )
            slot = idx % MAILBOX_SLOTS
            rec = pair + _SLOTS + 4 * slot
            if start == 0:
                self._match(ctrl, rec, t, nbytes, src, tag, fp)
            piece = data[start : start + self._chunk]
            piece.copy_(self._ring(src, self._rank, slot, piece.numel()))
            self._taken[src] = idx + 1
            ctrl[pair + _TAKEN] = idx + 1  # the chunk is free again
            self._wake(pair + _TAKEN, pair + _SENDER_SLEEPS)

    def _match(self, ctrl, rec: int, t: torch.Tensor, nbytes: int, src: int, tag: int, fp) -> None:
        dig = fp.digest() if fp is not None else 0
        their_tag, their_bytes, their_dtype, their_digest = ctrl[rec], ctrl[rec + 1], ctrl[rec + 2], ctrl[rec + 3]
        if (
            their_tag == tag
            and their_bytes == nbytes
            and their_dtype == WIRE_DTYPES.index(t.dtype)
            and not (dig and their_digest and their_digest != dig)
        ):
            return
        mine = fp.describe() if fp is not None else f"tag {tag}, {nbytes} bytes of {t.dtype}"
        raise CollectiveMismatchError(
            f"rank {self._sync.where}: point-to-point mismatch in group {self._sync.group!r}:\n  recv {mine}\n"
            f"  but the next message from group rank {src} has tag {their_tag}, {their_bytes} bytes of "
            f"{WIRE_DTYPES[their_dtype]}\nHINT: messages between a pair of ranks are matched in order; post "
            "receives in send order, with the same shape and dtype"
        )

    def _wake(self, word: int, flag: int) -> None:
        """After writing counter ``word``: wake the peer if it sleeps on it (its ``flag`` is up)."""
        if self._futex is not None:
            self._futex.fence()
            if self._ctrl[flag]:
                self._futex.wake(self._addr + 8 * word)

    def _wait(
        self, ready: Callable[[], bool], word: int, flag: int, peer: int, fp, what: str, tag: int, timeout: float
    ) -> None:
        """Until ``ready()``: spin, yield for 2 ms, then sleep on counter ``word`` (a futex, with ``flag``
        raised so the peer wakes us; without futexes, short sleeps); check the peer's life every 5 ms."""
        for _ in range(SPIN if threading.current_thread() is threading.main_thread() else WORKER_SPIN):
            if ready():
                return
        ctrl, futex = self._ctrl, self._futex
        start = time.monotonic()
        check, sleeping = start, False
        try:
            while not ready():
                now = time.monotonic()
                if now - start < 2e-3:
                    os.sched_yield()
                elif futex is not None:
                    if not sleeping:
                        ctrl[flag] = sleeping = 1
                    seen = ctrl[word]
                    if not ready():  # the kernel returns at once if the counter moved since
                        futex.wait(self._addr + 8 * word, seen, 1e-3)
                else:
                    time.sleep(2e-4)
                if now - check > 5e-3:
                    check = now
                    self._sync.check_alive([peer], fp, lambda _: ready())  # it may have posted, then exited
                    if now - start > timeout:
                        raise CollectiveTimeoutError(
                            f"rank {self._sync.where}: shm {what} group rank {peer} (tag {tag}) timed out after "
                            f"{timeout:g}s in group {self._sync.group!r}\nHINT: the peer never posted the matching op"
                        )
        finally:
            if sleeping:
                ctrl[flag] = 0

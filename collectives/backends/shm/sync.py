"""Step-counter synchronisation of an ``shm`` group, with the cross-rank check riding on it.

Each rank owns a monotonic step counter in its control row (see ``layout``); every
rank's counter moves in lockstep, op by op. An op's first step is its *arrival*: the rank
writes its op record (the fingerprint digest and, for large ops, where its tensor lives)
into the record half picked by the op's parity, then bumps its counter. "Wait until every
counter reaches s" is the only primitive. Waiting spins briefly (less when ranks outnumber
cores), yields a few times, then sleeps on the awaited peer's counter (a futex, see
``futex``) after raising its own "sleeping" flag; a rank that bumps its counter wakes its
counter's sleepers when any peer's flag is up.

Digests (``Fingerprint.digest()``) are compared right after arrival, so the cross-rank
check costs one integer compare per peer; on a mismatch every rank publishes its encoded fingerprint and
raises ``mismatch_error`` naming both sides. A peer that died raises
:class:`PeerDiedError`; a peer that never arrives, :class:`CollectiveTimeoutError`
naming it. After either the group is out of step for good (``broken``). An abort (``abort``, any
thread of any rank: the ``AbortSignal`` of this process, or a peer's poison in its control row)
raises :class:`CollectiveAbortedError` at the next liveness check, within milliseconds.

Who calls: ``algorithms`` (one op at a time per group: the caller's thread or the
group's worker thread, never both). Memory ordering relies on x86's total store order
(records and data are written before the counter that publishes them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from ...abort import AbortSignal
from ...env import usable_cores
from ...errors import CollectiveMismatchError, CollectiveTimeoutError, PeerDiedError
from ...fingerprint import ENCODED_SIZE, Fingerprint, mismatch_error
from .futex import FUTEX
from .layout import (
    RECORD_ALLOC,
    RECORD_BASE,
    RECORD_NBYTES,
    RECORD_OFFSET,
    ROW_ABORTED,
    ROW_ERROR_STEP,
    ROW_SLEEPING,
    Layout,
)
from .segment import Segment, pid_alive

SPIN = 400  # polls before the first yield when every rank has a core
YIELDS = 32  # then yields, then the futex
# Ranks outnumber cores: poll a few times, then yield the core, for up to a millisecond, before the futex.
# A yield hands the core straight to a runnable peer on it (the rank we wait for, often), where a futex
# sleep costs the waker a syscall and the sleeper a wake-up.
CROWDED_SPIN, CROWDED_YIELDS, CROWDED_YIELD_FOR = 4, 64, 1e-3
WORKER_SPIN = 8  # a worker thread hardly spins: spinning Python holds the GIL the caller's backward pass wants
_YIELD_FOR = 2e-4  # seconds of yielding at most before the futex (every rank has a core)
_SLEEP = 1e-3  # longest futex sleep: bounds a (rare) missed wake and paces liveness checks
_LIVENESS_EVERY = 5e-3  # seconds between checks that awaited peers still run


class StepSync:
    """The control rows of one group's segment, seen from one rank."""

    def __init__(
        self,
        seg: Segment,
        layout: Layout,
        rank: int,
        timeout: float,
        where: str,
        group: str,
        global_ranks: Sequence[int],
        base_addr: int,
        signal: AbortSignal | None = None,
    ):
        self.seg, self.layout, self.rank, self.world = seg, layout, rank, layout.world
        self.where, self.group, self.global_ranks = where, group, list(global_ranks)
        self.ctrl = seg.q  # int64 view of the whole segment
        self.rows = [layout.row(r) for r in range(self.world)]
        self.mine = self.rows[rank]
        self.peer_rows = [self.rows[r] for r in range(self.world) if r != rank]
        # where each peer's digest of an op lands, per record half (the check reads these after arrival)
        self._peer_digests = tuple(tuple(p + base for p in self.peer_rows) for base in RECORD_BASE)
        self.step = 0  # this rank's counter
        self.ops = 0  # collectives issued (parity picks the record half)
        self.timeout = timeout  # of the op in progress
        crowded = self.world > usable_cores()
        self.full_spin = CROWDED_SPIN if crowded else SPIN  # the caller's thread
        self.spin = self.full_spin  # of the op in progress (a worker thread spins less)
        self._yields = CROWDED_YIELDS if crowded else YIELDS
        self._yield_for = CROWDED_YIELD_FOR if crowded else _YIELD_FOR
        self._futex = FUTEX
        self._addr = base_addr  # of the segment: a row's step counter is at base_addr + 8 * row
        self.broken: str | None = None  # why the group is out of step for good
        self.signal = signal if signal is not None else AbortSignal()  # shared with the world's subgroups

    # -- the primitives ------------------------------------------------------------------
    def arrive(self, fp: Fingerprint | None, nbytes: int = 0, where: tuple[int, int] = (0, 0)) -> int:
        """Publish this rank's op record, bump the step, wait for all, compare digests.

        Returns the record base of this op (``RECORD_BASE[parity]``), for :meth:`record`."""
        ctrl, half = self.ctrl, self.ops & 1
        base = RECORD_BASE[half]
        at = self.mine + base
        dig = ((fp.base ^ fp.seq) or 1) if fp is not None else 0  # fp.digest(), inlined
        ctrl[at], ctrl[at + 1], ctrl[at + 2], ctrl[at + 3] = dig, nbytes, where[0], where[1]
        self.step += 1
        ctrl[self.mine] = self.step
        if self._futex is not None:
            self._wake()
        self.ops += 1  # now, not after the op: a rank leaving by a mismatch error must not reuse this half
        self.wait(self.step, fp)
        if dig:
            for i in self._peer_digests[half]:
                other = ctrl[i]
                if other != dig and other:
                    self._mismatch(fp, i - base)
        return base

    def advance(self, fp: Fingerprint | None = None) -> None:
        """One more step of the op in progress: bump the counter, wait for every peer."""
        self.step += 1
        self.ctrl[self.mine] = self.step
        if self._futex is not None:
            self._wake()
        self.wait(self.step, fp)

    def record(self, rank: int, base: int, field: int) -> int:
        """Field ``field`` (``RECORD_*``) of ``rank``'s record of the op whose record base is ``base``."""
        return self.ctrl[self.rows[rank] + base + field]

    def largest(self, base: int) -> int:
        """The largest byte count any rank published for this op."""
        return max(self.ctrl[row + base + RECORD_NBYTES] for row in self.rows)

    def zero_copy_offsets(self, base: int) -> list[int] | None:
        """Offsets of every rank's tensor in one shared alloc, or None when some rank's isn't in it."""
        ctrl = self.ctrl
        ident = ctrl[self.mine + base + RECORD_ALLOC]
        if not ident or any(ctrl[row + base + RECORD_ALLOC] != ident for row in self.rows):
            return None
        return [ctrl[row + base + RECORD_OFFSET] for row in self.rows]

    # -- waiting -------------------------------------------------------------------------
    def wait(self, target: int, fp: Fingerprint | None) -> None:
        ctrl = self.ctrl
        pending = [p for p in self.peer_rows if ctrl[p] < target]
        n = 0
        while pending:
            n += 1
            if n > self.spin:
                return self._slow_wait(target, pending, fp)
            pending = [p for p in pending if ctrl[p] < target]

    def _slow_wait(self, target: int, pending: list[int], fp: Fingerprint | None) -> None:
        """Past the spin: yield a few times, then sleep on the first pending peer's counter (a futex),
        so the rank we wait for gets the core; without futexes, sleep in growing steps."""
        ctrl, futex = self.ctrl, self._futex
        start = time.monotonic()
        deadline, check, delay, yields = start + self.timeout, start, 0.0, self._yields
        sleeping = False
        try:
            while True:
                pending = [p for p in pending if ctrl[p] < target]
                if not pending:
                    return
                if yields > 0:  # a few yields, for a bounded time: on a busy machine each may cost a slice
                    yields -= 1
                    os.sched_yield()
                    if time.monotonic() - start > self._yield_for:
                        yields = 0
                elif futex is not None:
                    if not sleeping:
                        ctrl[self.mine + ROW_SLEEPING] = sleeping = 1  # peers now wake us when they step
                    row = pending[0]
                    seen = ctrl[row]
                    if seen < target:  # the kernel returns at once if the counter moved since
                        futex.wait(self._addr + 8 * row, seen, _SLEEP)
                else:
                    time.sleep(delay)
                    delay = min(max(delay * 1.5, 2e-5), 1e-3)
                now = time.monotonic()
                if now - check > _LIVENESS_EVERY:
                    check = now
                    # A peer that arrived and then exited (it finished its last op) is not a death:
                    # its counter, read after its death is seen, is final.
                    self.check_alive([self.rank_of(p) for p in pending], fp, lambda r: ctrl[self.rows[r]] >= target)
                    if now > deadline:
                        self._timed_out(pending, fp)
        finally:
            if sleeping:
                ctrl[self.mine + ROW_SLEEPING] = 0

    def _wake(self) -> None:
        """After bumping our counter: wake peers that sleep on it (one flag read per peer otherwise)."""
        futex, ctrl = self._futex, self.ctrl
        futex.fence()
        for p in self.peer_rows:
            if ctrl[p + ROW_SLEEPING]:
                futex.wake(self._addr + 8 * self.mine)
                return

    def _timed_out(self, pending_rows: list[int], fp: Fingerprint | None) -> None:
        self.seg.maybe_unlink()  # a rank that never attached can't remove our name
        missing = ", ".join(str(self.global_ranks[self.rank_of(p)]) for p in pending_rows)
        self.broken = f"timeout in {self.what(fp)}"
        raise CollectiveTimeoutError(
            f"rank {self.where}: shm {self.what(fp)} in group {self.group!r} timed out after "
            f"{self.timeout:g}s; ranks that never arrived: {missing}\nHINT: a rank is stuck "
            "or skipped this collective (rank-dependent branch?); raise timeout= for slow steps"
        )

    # -- failures ------------------------------------------------------------------------
    def rank_of(self, row: int) -> int:
        return self.rows.index(row)

    def what(self, fp: Fingerprint | None) -> str:
        return f"{fp.op}#{fp.seq} ({fp.site})" if fp is not None else f"collective #{self.ops}"

    def poison(self) -> None:
        """After this process's signal was set: tell the peers (their next liveness check raises) and
        wake those asleep on our counter."""
        # The reason goes in this rank's fingerprint slot (used otherwise only by a mismatch, and an
        # aborted group has no more ops), so a woken peer names who was lost too.
        text = (self.signal.reason or "aborted").encode()[:ENCODED_SIZE]
        off = self.layout.fingerprints + self.rank * ENCODED_SIZE
        self.seg.mm[off : off + len(text)] = text
        self.ctrl[self.mine + ROW_ABORTED] = len(text)
        if self._futex is not None:
            self._futex.fence()
            self._futex.wake(self._addr + 8 * self.mine)

    def check_aborted(self, fp: Fingerprint | None) -> None:
        ctrl = self.ctrl
        if self.signal.reason is None:
            peer = next((self.rank_of(p) for p in self.peer_rows if ctrl[p + ROW_ABORTED]), None)
            if peer is None:
                return
            off = self.layout.fingerprints + peer * ENCODED_SIZE
            said = bytes(self.seg.mm[off : off + min(ctrl[self.rows[peer] + ROW_ABORTED], ENCODED_SIZE)])
            self.signal.set(f"{said.decode(errors='replace')} (group rank {peer} aborted group {self.group!r})")
        self.broken = f"aborted: {self.signal.reason}"
        raise self.signal.error(self.where, f"shm {self.what(fp)} in group {self.group!r}")

    def check_alive(self, ranks: list[int], fp: Fingerprint | None, done: Callable[[int], bool] | None = None) -> None:
        """Raise :class:`PeerDiedError` (and mark the group broken) when one of ``ranks`` is gone
        before doing its part: ``done(rank)``, asked only once the rank is seen dead, says it did;
        :class:`CollectiveAbortedError` when this process or a peer aborted the group."""
        self.check_aborted(fp)
        for r in ranks:
            pid = self.seg.pid(r)
            if not pid_alive(pid) and not (done is not None and done(r)):
                self.seg.maybe_unlink()
                self.broken = f"group rank {r} died"
                raise PeerDiedError(
                    f"rank {self.where}: group rank {r} (global rank {self.global_ranks[r]}, pid {pid}) died during "
                    f"shm {self.what(fp)} in group {self.group!r}\nHINT: see that rank's log for the root cause"
                )

    def _mismatch(self, fp: Fingerprint, peer_row: int) -> None:
        ctrl, layout = self.ctrl, self.layout
        off = layout.fingerprints + self.rank * ENCODED_SIZE
        self.seg.mm[off : off + ENCODED_SIZE] = fp.encode()
        ctrl[self.mine + ROW_ERROR_STEP] = self.step
        peer = self.rank_of(peer_row)
        deadline = time.monotonic() + min(self.timeout, 10.0)
        while ctrl[peer_row + ROW_ERROR_STEP] != self.step:
            if time.monotonic() > deadline:
                raise CollectiveMismatchError(
                    f"collective mismatch in group {self.group!r}: {fp.describe()}, but group rank {peer} "
                    "called something else (its fingerprint was not published; are checks off there?)"
                )
            self.check_alive([peer], fp)
            time.sleep(1e-3)
        off = layout.fingerprints + peer * ENCODED_SIZE
        raise mismatch_error(fp, Fingerprint.decode(self.seg.mm[off : off + ENCODED_SIZE]))

"""The background engine: Horovod's cycle, one thread per process set this rank belongs to.

User threads only *submit* (``submit``, ``join``): an op is queued with its name and a handle is
returned at once. The set's thread runs cycles: announce what was queued since the last cycle
(every member's row over the set's communicator, see ``negotiation`` and ``rows``), fold every
member's row into the shared table, then run the ops that every member has now submitted, in
the agreed order, fused (see ``execution``), and complete their handles. The same thread does
all the set's communication, so a communicator is never used by two threads, and the sets
progress independently (a set waiting for a slow member does not hold up another set).

Pace: a busy set cycles every ``HOROVOD_CYCLE_TIME`` ms (default 1; ops arriving within a cycle
are fused); a submission to an idle set starts a cycle within that time (a bucket that its
submitter waits on next leaves the thread asleep, see ``submit``); an idle set still
cycles every ``idle_s`` so that a member waiting for it learns about stalls, joins and shutdowns.

A user thread that waits on an op while the set's thread is not in a cycle runs the cycles
itself until its op is done (``drive``): the steady step's reduction then costs no hand-off to
the set's thread and back (two futex wakes and two GIL hand-offs, each a scheduler slice away
on a loaded machine). A cycle token keeps one thread at a time on the set's communicator;
shutdown, removal and join stay with the set's thread.

Stalls: a name that some members submitted and others did not is logged after
``HOROVOD_STALL_CHECK_TIME_SECONDS`` (60; which ranks miss which names) and fails on the
ranks that submitted it after ``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`` (default: the op timeout
``DISTTRAIN_HVD_TIMEOUT``, 300 s), so a rank-dependent bug is an error, never a hang.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Sequence

import torch

from collectives import CollectivesError, Communicator
from collectives.objects import allgather_json

from . import timeline
from .cache import ResponseCache
from .exceptions import HorovodInternalError, HorovodShutdownError, ProcessSetError
from .execution import Op, run_ready
from .handles import Handle
from .negotiation import (
    HEADER,
    JOINED,
    REMOVING,
    SHUTDOWN,
    Announcement,
    Table,
    mismatch_message,
    row_of,
)
from .pool import Pool
from .rows import RowExchange
from .settings import Settings
from .wire import Kind, digest, fuse_key

log = logging.getLogger(__name__)


class SetWorker:
    """One process set as seen from this rank. Members own a communicator and a thread."""

    def __init__(self, engine: Engine, set_id: int, ranks: Sequence[int], comm: Communicator | None):
        self.engine, self.id, self.ranks, self.comm = engine, set_id, list(ranks), comm
        self.member = comm is not None
        self.pool = Pool(comm) if comm is not None else None
        s = engine.settings
        self.table = Table(len(self.ranks), stall_warn_s=s.stall_warn_s, stall_fail_s=s.stall_fail_s)
        me = self.ranks.index(engine.rank) if engine.rank in self.ranks else 0
        self.cache = ResponseCache(
            s.cache_capacity, len(self.ranks), me, stall_warn_s=s.stall_warn_s, stall_fail_s=s.stall_fail_s
        )
        self._bits: dict[int, Op] = {}  # cache slot -> this rank's op waiting on its bit
        self._reannounce: list[Op] = []  # ops to announce in full next cycle (their slot was dropped)
        self._cv = threading.Condition()
        self._queue: collections.deque[Op] = collections.deque()
        self._inflight: dict[int, Op] = {}  # announced, by name digest
        self._names: dict[str, Op] = {}  # queued or announced, by name (duplicate check)
        self._join: Handle | None = None
        self._flags = 0
        self._last = 0.0
        self.error: BaseException | None = None
        self.stopped = False
        self._thread: threading.Thread | None = None
        self.rows = RowExchange(comm, len(self.ranks), HEADER + 2 * self.cache.words, s.slots)
        self._idle = True  # the thread waits for work (a submission wakes it) rather than for its cycle
        self._urgent = False  # a user thread waits on an op: the next cycle starts now (see _nudge)
        self._cycling = False  # the cycle token: a thread (the set's or a waiting user's) runs a cycle
        self._token_wait = False  # the set's thread waits for the token
        self._ended = False  # a cycle run by a user thread stopped the set: the set's thread cleans up

    def start(self) -> None:
        if self.member:
            self._thread = threading.Thread(target=self._loop, name=f"hvd-set{self.id}", daemon=True)
            self._thread.start()

    # -- user threads ---------------------------------------------------------------------
    def submit(self, op: Op, wake: bool = True) -> None:
        """Queue ``op``. ``wake=False``: leave the set's thread asleep (it still finds the op within
        ``idle_s``), for a submitter that waits on the op soon and so runs its cycle itself (a
        ``DistributedOptimizer`` bucket: waking the thread and handing the token back cost two
        futex wakes and two GIL hand-offs a step, on cores the compute needs)."""
        with self._cv:
            self._check_open(op.name)
            prior = self._names.get(op.name)
            if prior is not None and not prior.handle.done():  # done: only our bookkeeping lags
                from .exceptions import DuplicateNameError

                raise DuplicateNameError(
                    f"Requested to {op.kind.name.lower()} a tensor with the same name as another tensor that is "
                    f"currently being processed: {op.name!r} (process set {self.id})\n"
                    "HINT: give concurrent ops distinct names, or synchronize the first before resubmitting"
                )
            op.handle.alive = lambda: self.error
            op.handle.nudge = self._nudge
            self._names[op.name] = op
            self._queue.append(op)
            if wake and self._idle:  # a busy thread wakes at its cycle deadline anyway: no wake-up per gradient
                self._idle = False
                self._last = time.monotonic()  # cycle after HOROVOD_CYCLE_TIME, or when someone waits
                self._cv.notify()

    def _nudge(self, handle: Handle) -> None:
        """A user thread starts waiting on ``handle``, one of this set's ops: run the cycles itself
        while the set's thread is not in one (see the module), else have that thread cycle at once
        instead of at its deadline (the waiter submits nothing more to fuse with until its wait ends)."""
        while not handle.done():
            with self._cv:
                closing = self._ended or self.stopped or self.error is not None or self._flags or self._join
                idle = not (self._queue or self._inflight)
                mine = self._thread is None or threading.current_thread() is self._thread
                if self._cycling or closing or idle or mine:
                    if not self._urgent:
                        self._urgent = True
                        self._cv.notify()
                    return
                out, flags = self._start_cycle_locked()
            stop = True
            try:
                stop = self._cycle(out, flags)
            except BaseException as exc:
                self._fail(exc)
                if not isinstance(exc, Exception):
                    raise
            finally:
                with self._cv:
                    self._cycling = False
                    self._ended = self._ended or stop
                    if stop or self._token_wait:
                        self._cv.notify()
            if stop:
                return  # the set's thread stops the set and fails what is left

    def join(self, handle: Handle) -> None:
        with self._cv:
            self._check_open("join")
            handle.alive = lambda: self.error
            self._join = handle
            self._cv.notify()

    def request_stop(self, flag: int) -> None:
        with self._cv:
            self._flags |= flag
            self._cv.notify()

    def wait_stopped(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _check_open(self, what: str) -> None:
        if self.error is not None:
            raise HorovodInternalError(f"{what}: process set {self.id} failed earlier: {self.error}") from self.error
        if self.stopped or self._flags:
            raise HorovodShutdownError(
                f"{what}: Horovod has been shut down (or process set {self.id} removed). This was caused by an "
                "exception on one of the ranks or an attempt to submit an op after one of the ranks finished "
                "execution.\nHINT: every rank must submit the same names before any rank calls hvd.shutdown()"
            )

    # -- the set's thread -----------------------------------------------------------------
    def _loop(self) -> None:
        s = self.engine.settings
        try:
            while True:
                with self._cv:
                    while not self._ended:
                        if self._cycling:  # a waiting user thread runs this cycle
                            self._idle = self._token_wait = True
                            self._cv.wait(s.idle_s)
                            self._token_wait = False
                            continue
                        busy = bool(self._queue or self._inflight or self._join or self._flags)
                        wake = self._last + (s.cycle_s if busy else s.idle_s)
                        now = time.monotonic()
                        if now >= wake or (busy and self._urgent):
                            break
                        self._idle = not busy
                        self._cv.wait(wake - now)
                    if self._ended:
                        break
                    out, flags = self._start_cycle_locked()
                try:
                    stop = self._cycle(out, flags)
                finally:
                    with self._cv:
                        self._cycling = False
                if stop:
                    break
        except BaseException as exc:  # transport failure, dead peer: every waiter hears it
            self._fail(exc)
        finally:
            self._stop()

    def _start_cycle_locked(self) -> tuple[list[Op], int]:
        """Take the cycle token and this cycle's ops (caller holds ``_cv``, and the token is free)."""
        self._idle = self._urgent = False
        self._cycling = True
        out = [self._queue.popleft() for _ in range(min(self.engine.settings.slots, len(self._queue)))]
        for op in out:
            self._inflight[op.ann.name] = op
        self._last = time.monotonic()
        return out, self._flags | (JOINED if self._join is not None else 0)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc if isinstance(exc, HorovodInternalError) else HorovodInternalError(str(exc))
        self.error.__cause__ = exc
        log.error("rank %s: Horovod engine for process set %s failed: %s", self.engine.rank, self.id, exc)

    def _cycle(self, out: list[Op], flags: int) -> bool:
        """One cycle; True when the set stops (shutdown or removal agreed)."""
        s, size, cache = self.engine.settings, len(self.ranks), self.cache
        clock = int((time.monotonic() - self.engine.t0) * 1e3)
        free = self.pool.free_mask()
        full, self._reannounce = self._reannounce, []
        invalid = []
        for op in out:
            slot, op.cache = cache.lookup(op.ann)
            if slot is None:
                full.append(op)
            elif slot < 0:
                invalid.append(-1 - slot)
                full.append(op)
            else:
                self._bits[slot] = op
        if len(full) > s.slots:  # the rest go out in the next cycles
            full, self._reannounce = full[: s.slots], full[s.slots :]
        W = cache.words
        row = row_of(flags, clock, [op.ann for op in full], 0, free)
        heads, rows = self.rows.exchange(
            row[:HEADER] + cache.words_of(self._bits) + cache.words_of(invalid), row[HEADER:]
        )
        joined = [bool(r[0] & JOINED) for r in rows]
        hit = cache.decide(
            [h[HEADER : HEADER + W] for h in heads], [h[HEADER + W : HEADER + 2 * W] for h in heads], joined, rows[0][2]
        )
        verdict = self.table.absorb(rows)
        for slot in hit.ready_slots:
            self._bits.pop(slot, None)
        verdict.failed = hit.failed + verdict.failed
        verdict.stalled = hit.stalled + verdict.stalled
        stalled_out = {f.name for f in hit.failed}
        for slot in hit.dropped + hit.reannounce + cache.insert(verdict.ready, joined):
            op = self._bits.pop(slot, None)
            if op is not None and op.ann.name not in stalled_out and self._inflight.get(op.ann.name) is op:
                op.cache = "re-announced: its cache slot was dropped (another rank's op differs, a stall, or Join)"
                self._reannounce.append(op)
        verdict.ready = hit.ready + verdict.ready
        t_agreed = time.perf_counter()
        tl = timeline.active()  # read before any handle completes: a later start_timeline sees later ops only
        unexplained = [f.name for f in verdict.failed if f.message is None]
        explained = self._describe(unexplained) if unexplained else {}
        for f in verdict.failed:
            op = self._take(f.name)
            if op is not None:
                msg = f.message if f.message is not None else explained[f.name]
                if f.missing is not None:
                    msg = (
                        f"{msg}: ranks {[self.ranks[i] for i in f.missing]} of process set {self.id} never submitted "
                        f"it (Horovod's stall inspector)\nHINT: every rank of the set must submit the same names; "
                        "look for a collective inside a rank-dependent branch"
                    )
                op.handle.fail(HorovodInternalError(f"{op.name}: {msg}"))
        for st in verdict.stalled:
            self._report_stall(st)
        for r in verdict.ready:
            op = self._inflight.get(r.name)
            if op is not None:
                op.t_agreed = t_agreed
        agreed_free = free
        for r in rows:
            agreed_free &= r[3]
        run_ready(
            verdict.ready, self._inflight, self.comm if size > 1 else None, s.fusion_bytes, self.pool, agreed_free
        )
        with self._cv:  # one acquisition per cycle, not one per op
            taken = [self._take_locked(r.name) for r in verdict.ready]
        if tl is not None:
            for op in taken:
                if op is not None:
                    tl.record(
                        op.name,
                        op.kind.name,
                        op.t_submit,
                        op.t_agreed,
                        time.perf_counter(),
                        {"cache": op.cache or "hit"},
                    )
            missed = [op for op in full if op.cache]
            if missed:
                tl.instant(
                    "CYCLE_CACHE_MISS", t_agreed, {"ops": len(missed), "why": sorted({op.cache for op in missed})}
                )
        if verdict.join_done is not None:
            with self._cv:
                h, self._join = self._join, None
            if h is not None:
                h.complete(self.ranks[verdict.join_done])
        return verdict.shutdown or verdict.removed

    def _take(self, name: int) -> Op | None:
        with self._cv:
            return self._take_locked(name)

    def _take_locked(self, name: int) -> Op | None:
        op = self._inflight.pop(name, None)
        if op is not None:
            self._names.pop(op.name, None)
        return op

    def _describe(self, names: list[int]) -> dict[int, str]:
        """Every member's readable view of the ops whose signatures differ, exchanged so that
        every rank raises the same message, naming both sides (Horovod's words)."""
        size = len(self.ranks)
        mine = [op.description if (op := self._inflight.get(name)) is not None else None for name in names]
        everyone = allgather_json(self.comm, mine) if size > 1 else [mine]
        out = {}
        for k, name in enumerate(names):
            descs = {r: json.loads(theirs[k]) for r, theirs in enumerate(everyone) if theirs[k]}
            out[name] = mismatch_message(descs, self.ranks)
        return out

    def _report_stall(self, st) -> None:
        op = self._inflight.get(st.name)
        missing = [self.ranks[i] for i in st.missing]
        what = repr(op.name) if op is not None else f"an op this rank has not submitted (digest {st.name:x})"
        if op is not None and not op.cache:
            what += " (waiting on its response-cache bit)"
        log.warning(
            "rank %s: stall: %s in process set %s has waited %.0fs for ranks %s, which have not submitted it "
            "(Horovod's stall inspector: one or more ranks skipped or reordered a collective)",
            self.engine.rank,
            what,
            self.id,
            st.waited_s,
            missing,
        )

    def _stop(self) -> None:
        with self._cv:
            self.stopped = True
            left = list(self._queue) + list(self._inflight.values())
            self._bits.clear()
            self._reannounce.clear()
            self._queue.clear()
            self._inflight.clear()
            self._names.clear()
            join, self._join = self._join, None
        err = self.error or HorovodShutdownError(
            "Horovod has been shut down before this op completed (some rank called hvd.shutdown() or removed "
            "its process set)"
        )
        for op in left:
            op.handle.fail(err)
        if join is not None:
            join.fail(err)
        if self.comm is not None and self.id != 0:
            try:
                self.comm.close()
            except CollectivesError:
                pass


class Engine:
    """This rank's process sets and their threads. Built by ``hvd.init()``."""

    def __init__(self, world: Communicator, rank: int, settings: Settings):
        self.settings, self.rank, self.world_comm = settings, rank, world
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self.sets: dict[int, SetWorker] = {0: SetWorker(self, 0, range(world.world_size), world)}
        self._next_id = 1
        self._ps_calls = 0
        self.sets[0].start()

    def worker(self, set_id: int | None) -> SetWorker:
        with self._lock:
            w = self.sets.get(set_id) if set_id is not None else None
        if w is None:
            raise ProcessSetError(
                f"process set id {set_id} is not registered (removed, or never added)\n"
                "HINT: register it with hvd.add_process_set() on every rank before using it"
            )
        return w

    # -- process sets: collective over every rank, agreed on the global set ---------------
    def _set_op(self, what: str, ranks: list[int], action) -> Handle:
        self._ps_calls += 1
        name = f"process_set.{what}.{self._ps_calls}"
        sig = digest(f"{what}|{ranks}")
        ann = Announcement(digest(name), sig, fuse_key(Kind.PROCESS_SET, torch.int64, 0, (1.0, 1.0)), 0)
        desc = json.dumps({"kind": "PROCESS_SET", "dtype": "", "shape": ranks, "op": what, "scales": [], "root": -1})
        h = Handle(name)
        self.sets[0].submit(Op(name, Kind.PROCESS_SET, ann, desc, h, action=action))
        return h

    def add_set(self, ranks: list[int]) -> Handle:
        def action():
            with self._lock:
                for sid, w in self.sets.items():
                    if w.ranks == ranks:
                        raise ProcessSetError(
                            f"Attempted to add a duplicate process set: ranks {ranks} are already process set {sid}"
                        )
            comm = self.world_comm.new_group(ranks)  # every rank, here, in agreed order
            with self._lock:
                sid, self._next_id = self._next_id, self._next_id + 1
                w = self.sets[sid] = SetWorker(self, sid, ranks, comm)
            w.start()
            return sid

        return self._set_op("add", ranks, action)

    def remove_set(self, set_id: int) -> Handle:
        def action():
            with self._lock:
                w = self.sets.pop(set_id, None)
            if w is None:
                return False
            if w.member:
                w.request_stop(REMOVING)  # its members stop after a cycle in which all of them flag it
            return True

        return self._set_op("remove", [set_id], action)

    def shutdown(self) -> None:
        """This rank stops: each of its sets flags shutdown and stops after that cycle (the
        other members stop with it, as in Horovod)."""
        with self._lock:
            workers = list(self.sets.values())
        for w in workers:
            if w.member and not w.stopped:
                w.request_stop(SHUTDOWN)
        for w in workers:
            w.wait_stopped(self.settings.timeout)

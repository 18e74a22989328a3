"""Aborting a group's pending ops from another thread: the signal every abortable backend shares.

Who calls: a backend's ``abort(reason)`` (any thread) sets the signal once; a backend's wait checks
it (shm: at its liveness checks, every few milliseconds; torch: its wait blocks on an event that the
op's completion or the abort sets). Why one small object: the groups made from a world share one
signal, so aborting the world wakes an op pending in any of its subgroups.
"""

from __future__ import annotations

import threading

from .errors import CollectiveAbortedError


class AbortSignal:
    """Set at most once (the first reason wins); wakes every registered waiter."""

    __slots__ = ("reason", "watched", "_lock", "_waiters")

    def __init__(self):
        self.reason: str | None = None
        self.watched = False  # someone may abort: waits register (torch pays a callback per pending op)
        self._lock = threading.Lock()
        self._waiters: set[threading.Event] = set()

    def set(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            waiters = list(self._waiters)
        for ev in waiters:
            ev.set()

    def wait(self, done: threading.Event, timeout: float | None) -> bool:
        """Block until ``done`` is set or the signal is (True), or ``timeout`` passes (False)."""
        with self._lock:
            if self.reason is not None:
                return True
            self._waiters.add(done)
        try:
            return done.wait(timeout)
        finally:
            with self._lock:
                self._waiters.discard(done)

    def error(self, where: str, what: str) -> CollectiveAbortedError:
        return CollectiveAbortedError(
            f"rank {where}: {what} aborted: {self.reason}\nHINT: the world is being rebuilt; "
            "this group is only good for close()"
        )

    def check(self, where: str, what: str) -> None:
        if self.reason is not None:
            raise self.error(where, what)

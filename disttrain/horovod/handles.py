"""Handles: what an ``*_async`` op returns, and ``poll``/``synchronize`` on it.

A :class:`Handle` is completed by the engine's background thread (with a result or an error)
and waited on by the user's thread. Horovod hands out integers; so do we (a registry maps them
to handles until ``synchronize`` collects them).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

from .exceptions import HorovodError, HorovodInternalError

_WAIT_SLICE = 1.0  # seconds between checks that the engine is still alive


def _nothing(handle: Handle) -> None:
    pass


class Handle:
    """One submitted op (or a group of them). ``finish`` turns the engine's raw result into
    what the user gets (runs on the user's thread, inside ``result``)."""

    def __init__(self, name: str, finish: Callable[[object], object] | None = None):
        self.name, self._finish = name, finish
        # A latch: held from birth, released once by the engine. A bare lock costs a fraction of an
        # Event (a Condition and its lock), and a training step makes one handle per gradient.
        self._latch = threading.Lock()
        self._latch.acquire()
        self._done = False
        self._value: object = None
        self._error: BaseException | None = None
        self.alive: Callable[[], BaseException | None] = lambda: None  # the engine's failure, if any
        # The engine's "someone waits on this handle": cycle now (the waiter may run the cycles itself)
        self.nudge: Callable[[Handle], None] = _nothing

    # -- engine side ----------------------------------------------------------------------
    def complete(self, value: object = None) -> None:
        if not self._done:
            self._value, self._done = value, True
            self._latch.release()

    def fail(self, error: BaseException) -> None:
        if not self._done:
            self._error, self._done = error, True
            self._latch.release()

    # -- user side ------------------------------------------------------------------------
    def done(self) -> bool:
        return self._done

    def wait(self) -> None:
        if self._done:
            return
        self.nudge(self)  # nothing more comes from this thread to fuse with: no reason to wait for the cycle time
        while not self._latch.acquire(timeout=_WAIT_SLICE):
            dead = self.alive()
            if dead is not None and not self._done:
                raise HorovodInternalError(f"{self.name}: the Horovod background thread stopped: {dead}") from dead
        self._latch.release()  # open for good: other waiters pass too

    def result(self):
        self.wait()
        if self._error is not None:
            raise self._error
        value, self._value = self._value, None  # the caller owns it now (pool buffers count owners)
        return self._finish(value) if self._finish is not None else value


class GroupHandle(Handle):
    """Several handles as one (grouped ops): done when all are; the result is the list."""

    def __init__(self, name: str, parts: list[Handle], finish: Callable[[object], object] | None = None):
        super().__init__(name, finish)
        self.parts = parts

    def done(self) -> bool:
        return all(p.done() for p in self.parts)

    def result(self):
        values, first_error = [], None
        for p in self.parts:  # wait for every part, so no transfer still writes into a tensor after an error
            try:
                values.append(p.result())
            except HorovodError as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return self._finish(values) if self._finish is not None else values


_handles: dict[int, Handle] = {}
_ids = itertools.count(1)
_lock = threading.Lock()


def next_id() -> int:
    """The next handle number (Horovod names unnamed ops by it: ``allreduce.noname.<n>``)."""
    return next(_ids)


def register(h: Handle, hid: int | None = None) -> int:
    hid = next(_ids) if hid is None else hid
    with _lock:
        _handles[hid] = h
    return hid


def get(hid: int) -> Handle | None:
    return _handles.get(hid)


_unnamed: dict[tuple[str, int | None], int] = {}


def unnamed_count(prefix: str, set_id: int | None) -> int:
    """The number of the next unnamed op of this kind on this set (1, 2, ...)."""
    with _lock:
        n = _unnamed[(prefix, set_id)] = _unnamed.get((prefix, set_id), 0) + 1
    return n


def forget_all() -> None:
    with _lock:
        _handles.clear()
        _unnamed.clear()


def poll(handle: int) -> bool:
    """Any thread: True once the op behind ``handle`` finished (``synchronize`` won't block). Never blocks."""
    h = _handles.get(handle)
    if h is None:
        raise HorovodError(f"poll({handle!r}): unknown handle (already synchronized?)")
    return h.done()


def synchronize(handle: int):
    """Any thread: wait for the op behind ``handle`` and return its output (a tensor, a list for
    grouped ops, ``(output, received_splits)`` for alltoall). Raises the op's error (every rank
    that submitted a failing op gets it here, as in Horovod)."""
    with _lock:
        h = _handles.pop(handle, None)
    if h is None:
        return None  # as Horovod: an unknown (already synchronized) handle is no error
    return h.result()

"""One daemon thread per queue of asynchronous ops, for backends whose ops block the caller.

Who uses it: a backend that runs its ops synchronously (``shm`` does; any backend without
a progress engine of its own can) and wants ``async_op=True`` to overlap with the caller.
Ops submitted to one :class:`WorkerThread` run in submission order; the thread starts on
the first submit and stops at :meth:`WorkerThread.stop`. An op's exception is kept and
raised by :meth:`ThreadWork.wait` on the caller's thread.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from ..errors import CollectiveTimeoutError


class ThreadWork:
    """The :class:`~collectives.types.Work` of an op queued on a :class:`WorkerThread`."""

    def __init__(self):
        self._event, self.error = threading.Event(), None

    def wait(self, timeout: float | None = None) -> None:
        if not self._event.wait(timeout):
            raise CollectiveTimeoutError(f"async op did not complete within {timeout}s")
        if self.error is not None:
            raise self.error

    def is_completed(self) -> bool:
        return self._event.is_set()


class WorkerThread:
    """A daemon thread running submitted ops in order; started on first use."""

    def __init__(self, name: str):
        self._name, self._queue, self._cv = name, collections.deque(), threading.Condition()
        self._thread: threading.Thread | None = None
        self._last: ThreadWork | None = None

    def submit(self, fn: Callable[[], None] | None) -> ThreadWork:
        """Queue ``fn`` (None stops the thread once the queue ahead of it is done)."""
        work = ThreadWork()
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._queue.append((fn, work))
            self._last = work
            self._cv.notify()
        return work

    def drain(self) -> None:
        """Block until every op submitted so far has finished (errors stay with their handles)."""
        last = self._last
        if last is not None:
            last._event.wait()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                fn, work = self._queue.popleft()
            if fn is None:
                work._event.set()
                return
            try:
                fn()
            except BaseException as exc:  # surfaced by wait()
                work.error = exc
            work._event.set()

    def stop(self) -> None:
        if self._thread is not None:
            self.submit(None).wait(5.0)

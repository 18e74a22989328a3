"""Linux futexes on shared memory, through ``ctypes``: block until a 32-bit word changes.

Who uses it: ``sync`` (a rank waiting for a peer's step counter) and anything else
that waits on a word in a segment mapped by several processes. A futex lets the waiter
sleep in the kernel and the rank it waits for run, which matters when ranks outnumber
cores: a spinning (or merely yielding) waiter steals the core from the rank that holds the
data. ctypes releases the GIL for the call, so other Python threads of the waiting
process run meanwhile.

The futexes are shared (no ``FUTEX_PRIVATE_FLAG``): waiter and waker are different
processes mapping the same file. ``FUTEX`` is None where the syscall number is unknown
(not Linux on x86-64 or aarch64); callers then fall back to sleeping.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading

_SYSCALL = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}
_WAIT, _WAKE = 0, 1
_ALL = 0x7FFFFFFF


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Futex:
    """``wait(addr, expected, seconds)`` and ``wake(addr)`` on 32-bit words at raw addresses."""

    def __init__(self, number: int):
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._syscall.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
        self._number = number
        self._timeouts: dict[float, _Timespec] = {}
        self._fence_lock = threading.Lock()

    def wait(self, addr: int, expected: int, seconds: float) -> None:
        """Sleep while the word at ``addr`` holds the low 32 bits of ``expected``, at most ``seconds``.
        Returns early on a wake, a signal, or when the word already differs."""
        ts = self._timeouts.get(seconds)
        if ts is None:
            ts = self._timeouts[seconds] = _Timespec(int(seconds), int((seconds % 1) * 1e9))
        self._syscall(self._number, addr, _WAIT, expected & 0xFFFFFFFF, ctypes.addressof(ts))

    def wake(self, addr: int) -> int:
        """Wake every process sleeping on the word at ``addr``; returns how many were woken."""
        return self._syscall(self._number, addr, _WAKE, _ALL, None)

    def fence(self) -> None:
        """A full memory barrier (a locked instruction): orders a waker's store of the word before its
        load of the waiters' "sleeping" flags, so a waiter that announced itself is never missed."""
        self._fence_lock.acquire()
        self._fence_lock.release()


def _make() -> Futex | None:
    if not sys.platform.startswith("linux") or os.environ.get("DISTTRAIN_SHM_FUTEX", "1") == "0":
        return None
    number = _SYSCALL.get(platform.machine().lower())
    if number is None:
        return None
    try:
        return Futex(number)
    except (OSError, AttributeError):
        return None


FUTEX = _make()

"""The futex that shm ranks sleep on: a process asleep on a word in a shared mapping is woken by
another process (shared, not private, futexes), and a wait on a word that already moved returns."""

from __future__ import annotations

import ctypes
import mmap
import os
import time

import pytest

from collectives.backends.shm.futex import FUTEX

pytestmark = pytest.mark.skipif(FUTEX is None, reason="no futex syscall number for this platform")


def _word(mm: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mm))


@pytest.mark.unit
@pytest.mark.timeout(60)
def test_a_sleeping_process_is_woken_through_shared_memory():
    mm = mmap.mmap(-1, 4096)  # MAP_SHARED | MAP_ANONYMOUS: the forked child maps the same page
    addr = _word(mm)
    pid = os.fork()
    if pid == 0:  # child: sleep while the word is 0 (it stays 0), until woken or 30 s pass
        FUTEX.wait(addr, 0, 30.0)
        os._exit(0)
    woken, deadline = 0, time.monotonic() + 20
    while not woken and time.monotonic() < deadline:  # until the child is asleep in the kernel
        time.sleep(0.01)
        woken = FUTEX.wake(addr)  # the count proves the child slept on this very word
    _, status = os.waitpid(pid, 0)
    assert woken == 1, "the child never slept on the shared word (private futex or wrong address?)"
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.unit
def test_wait_returns_at_once_when_the_word_moved():
    mm = mmap.mmap(-1, 4096)
    mm[0] = 5
    FUTEX.wait(_word(mm), 4, 30.0)  # expected 4, found 5: the kernel refuses to sleep
    assert FUTEX.wake(_word(mm)) == 0

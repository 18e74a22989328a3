"""The flight recorder's process-level parts, in one process and its real children: a fork waits while
the watch thread is mid-work (a DataLoader worker never starts from a half-held lock of that thread),
and a dump lists the process's children with their state, which the hang report prints."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from collectives import flight_recorder
from launcher.hang import format_report

pytestmark = pytest.mark.unit


def test_a_fork_waits_for_the_watch_thread_to_finish_its_work():
    released = []

    def watch_mid_work():
        with flight_recorder._FORK_GUARD:
            time.sleep(0.5)
            released.append(time.monotonic())

    t = threading.Thread(target=watch_mid_work)
    t.start()
    time.sleep(0.1)  # the "watch thread" now holds the guard
    pid = os.fork()
    if pid == 0:
        # the child starts with the guard free: the watch work it would inherit half-done never is
        os._exit(0 if flight_recorder._FORK_GUARD.acquire(timeout=1) else 3)
    forked = time.monotonic()
    t.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert released and forked >= released[0], "fork ran while the watch thread held its lock"


def test_a_dump_lists_children_and_the_report_prints_them():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        snap = flight_recorder.snapshot(0, "hostA", "n1")
        mine = [c for c in snap["children"] if c["pid"] == child.pid]
        assert mine and mine[0]["state"] == "S" and mine[0]["wchan"], snap["children"]
        report = format_report([snap], "test")
        assert f"pid {child.pid}: state S, waiting in {mine[0]['wchan']}" in report, report
    finally:
        child.kill()
        child.wait()


def test_the_fast_paths_entry_reads_as_a_full_one():
    """``enter`` (a signature called before: its first site given) records what ``begin`` does, in the
    same ring, and ends the same way; the null recorder keeps nothing."""
    rec = flight_recorder.FlightRecorder(2)
    first = rec.begin(0, "allreduce", "world", ((4,),), "float32")
    again = rec.enter(1, "allreduce", "world", ((4,),), "float32", first[5])
    rec.end(first)
    rec.enter(2, "broadcast", "world", ((3,),), "float32", ("train.py", 7))  # the ring keeps the last 2
    rec.end(again)
    got = rec.records()
    assert [r["seq"] for r in got] == [1, 2] and rec.completed == 2
    assert got[0]["site"].startswith(__file__) and got[0]["end"] is not None
    assert got[1]["site"] == "train.py:7" and got[1]["end"] is None and got[0]["bytes"] == 16
    null = flight_recorder.NullRecorder(1)
    null.end(null.enter(0, "allreduce", "world", ((4,),), "float32", "x:1"))
    assert null.records() == []

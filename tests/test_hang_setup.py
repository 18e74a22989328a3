"""A rank still setting up (imports, model build) is no hang: the flight recorder's watch thread beats only
once the rank's first collective began, so the agent's :class:`launcher.hang.HangWatch` does not start its
clock on a rank that never entered one, however long its set-up takes, while a rank waiting in its first
collective is watched from the moment it entered it. Runs in a child process (one watch thread per process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from launcher.hang import HangWatch

pytestmark = pytest.mark.unit
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = textwrap.dedent(
    """
    import os, sys, time
    from collectives import flight_recorder as fr

    os.environ["DISTTRAIN_TRACE_DIR"] = sys.argv[1]
    fr.maybe_start_watch(0, "hostA")
    print("set-up", flush=True)
    sys.stdin.readline()  # set-up lasts until the test says
    fr.RECORDER.begin(0, "broadcast", "world", ((4,),), "float32")  # enters its first collective, never ends
    print("waiting", flush=True)
    time.sleep(30)
    """
)


def test_set_up_is_not_a_hang_but_a_first_collective_that_never_ends_is(tmp_path):
    trace = tmp_path / "trace"
    watch = HangWatch(str(trace), [0], timeout=0.5, host="hostA", dump_wait=2.0)
    env = {**os.environ, "PYTHONPATH": ROOT}
    child = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(trace)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert child.stdout.readline().strip() == "set-up"
        end = time.monotonic() + 1.5  # three times the timeout, five watch periods
        while time.monotonic() < end:
            assert watch.stalled() is None
            time.sleep(0.05)
        assert not (trace / "rank0.beat").exists()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "waiting"
        deadline = time.monotonic() + 10
        why = None
        while why is None and time.monotonic() < deadline:
            why = watch.stalled()
            time.sleep(0.05)
        assert why is not None and why.startswith("no collective finished on hostA"), why
    finally:
        child.kill()
        child.wait()
    assert (trace / "rank0.beat").read_text().strip() == "0"

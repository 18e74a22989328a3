"""A worker moved in place (recovery in place: a new round's trace directory and rank, same process)
is watched under its new place: the flight recorder's watch thread, started as rank 2 in round 0's
directory, moves to rank 1 in round 1's when the rebuilt communicator calls ``maybe_start_watch``
again; it beats there only once a collective of the new world ended (the rebuild is no hang), and the
agent's :class:`launcher.hang.HangWatch` of the new round collects its dump as ``rank 1@host``.
Runs in a child process: the watch thread is once per process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from launcher.hang import HangWatch

pytestmark = pytest.mark.unit
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = textwrap.dedent(
    """
    import os, sys, time
    from collectives import flight_recorder as fr

    def op():
        fr.RECORDER.end(fr.RECORDER.begin(0, "allreduce", "world", ((4,),), "float32"))

    def wait_for(path):
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            assert time.monotonic() < deadline, path
            time.sleep(0.02)

    old, new = sys.argv[1], sys.argv[2]
    os.environ["DISTTRAIN_TRACE_DIR"] = old
    fr.maybe_start_watch(2, "hostB")
    op()
    wait_for(os.path.join(old, "rank2.beat"))
    os.environ["DISTTRAIN_TRACE_DIR"] = new  # the agent's word: the new place
    fr.maybe_start_watch(1, "hostB")
    time.sleep(0.6)  # three watch periods: no beat while the new world has not finished an op
    print("beat before an op:", os.path.exists(os.path.join(new, "rank1.beat")), flush=True)
    op()
    wait_for(os.path.join(new, "rank1.beat"))
    print("beating", flush=True)
    time.sleep(30)  # stands still: the agent's watch asks for its dump
    """
)


def test_a_moved_worker_beats_and_dumps_under_its_new_rank(tmp_path):
    old, new = tmp_path / "attempt0", tmp_path / "attempt1"
    old.mkdir(mode=0o700)
    watch = HangWatch(str(new), [1], timeout=30.0, host="hostB", dump_wait=5.0)  # makes round 1's directory
    env = {**os.environ, "PYTHONPATH": ROOT}
    child = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(old), str(new)], env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert child.stdout.readline().strip() == "beat before an op: False"
        assert child.stdout.readline().strip() == "beating"
        (dump,) = watch.collect()
        assert dump["rank"] == 1 and dump["host"] == "hostB" and not dump.get("missing"), dump
        assert [r["op"] for r in dump["records"]] == ["allreduce", "allreduce"], dump["records"]
        assert not (old / "rank2.dump.json").exists()  # the old round's directory is no longer served
        assert (new / "rank1.stacks.txt").exists()  # faulthandler's fallback moved with it
    finally:
        child.kill()
        child.wait()
        child.stdout.close()

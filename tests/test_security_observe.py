"""Attacks on what a job writes to see itself: ``profiles/`` (torch.profiler traces), ``traces/``
(flight-recorder dumps) and the CSV tracker's files inside the run directory. A shared-group run directory lets the group
create entries there, so the second user (``dt_intruder``) plants a symlink to the owner's files,
or makes the directory themselves; the job must write through neither, and a run of its own
creates both private (0700 directories, 0600 files)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from tests.support.harness import ROOT
from tests.support.users import intruder, run_as, sticky_base

VICTIM = b"the owner's own data\n"
PROFILE = ["profile.steps=[2, 3]", "profile.ranks=[0, 1]", "train.steps=4", "train.eval_every=0"]


@pytest.fixture
def base():
    with sticky_base("dt-observe-") as d:
        yield d


def _shared_run_dir(base: str, gid: int) -> str:
    """A shared-group run directory (``run.shared_group``): the group, the intruder's, may create in it."""
    run = os.path.join(base, "run")
    os.mkdir(run)
    os.chown(run, 0, gid)
    os.chmod(run, 0o2770)
    return run


def _victim_dir(base: str) -> str:
    """The owner's directory with a file named as a trace; readable (so the intruder can link to it)."""
    d = os.path.join(base, "owner")
    os.makedirs(d, mode=0o755)
    for name in ("rank0.trace.json", "rank1.trace.json", "rank0.dump.json"):
        with open(os.path.join(d, name), "wb") as f:
            f.write(VICTIM)
    return d


def _untouched(victim: str) -> bool:
    names = sorted(os.listdir(victim))
    same = all(open(os.path.join(victim, n), "rb").read() == VICTIM for n in names)
    return same and names == ["rank0.dump.json", "rank0.trace.json", "rank1.trace.json"]


def _disttrain_run(run_dir: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "disttrain.cli", "run", "configs/digits.yaml", f"run.dir={run_dir}", *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )


@pytest.mark.timeout(300)
def test_a_planted_profiles_symlink_or_their_directory_is_refused_and_nothing_is_written(base):
    other = intruder()
    victim = _victim_dir(base)
    run = _shared_run_dir(base, other.pw_gid)
    assert run_as(other, ["ln", "-s", victim, os.path.join(run, "profiles")], timeout=30).returncode == 0
    proc = _disttrain_run(run, "run.shared_group=true", *PROFILE)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "profile:" in out and "a symlink is not followed" in out and "rank 0@" in out, out[-3000:]
    assert _untouched(victim) and os.path.islink(os.path.join(run, "profiles"))
    # Their own directory, open to all, made before the job: refused, left empty.
    os.unlink(os.path.join(run, "profiles"))
    theirs = os.path.join(run, "profiles")
    assert run_as(other, ["mkdir", "-m", "777", theirs], timeout=30).returncode == 0
    proc = _disttrain_run(run, "run.shared_group=true", *PROFILE)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"is owned by {other.pw_name}" in out, out[-3000:]
    assert os.listdir(theirs) == [] and os.stat(theirs).st_uid == other.pw_uid


@pytest.mark.timeout(300)
def test_the_csv_tracker_never_writes_or_reads_through_planted_symlinks(base):
    other = intruder()
    victim = _victim_dir(base)
    run = _shared_run_dir(base, other.pw_gid)
    links = {"metrics.csv.tmp": "rank0.trace.json", "run_info.json": "rank1.trace.json"}  # the old temporary too
    plant = " && ".join(f"ln -s {os.path.join(victim, v)} {os.path.join(run, n)}" for n, v in links.items())
    assert run_as(other, ["sh", "-c", plant], timeout=30).returncode == 0
    args = ["run.shared_group=true", "log.trackers=[csv]", "train.steps=4", "train.log_every=2", "train.eval_every=0"]
    proc = _disttrain_run(run, *args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert _untouched(victim)
    for name in ("metrics.csv", "run_info.json"):
        st = os.lstat(os.path.join(run, name))
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640, (name, oct(st.st_mode))
    # A metrics.csv swapped for a link to the owner's file before a resume: refused, neither read nor written.
    os.unlink(os.path.join(run, "metrics.csv"))
    os.symlink(os.path.join(victim, "rank0.dump.json"), os.path.join(run, "metrics.csv"))
    proc = _disttrain_run(run, *args[:-3], "train.steps=6", "train.log_every=2", "train.eval_every=0")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "metrics.csv" in out and "symlink is not followed" in out, out[-3000:]
    assert _untouched(victim)


@pytest.mark.timeout(300)
def test_profiles_are_private_to_the_owner(base):
    run = os.path.join(base, "run")
    proc = _disttrain_run(run, *PROFILE)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    profiles = os.path.join(run, "profiles")
    assert stat.S_IMODE(os.lstat(profiles).st_mode) == 0o700
    assert sorted(os.listdir(profiles)) == ["rank0.trace.json", "rank1.trace.json"]
    for name in os.listdir(profiles):
        st = os.lstat(os.path.join(profiles, name))
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, (name, oct(st.st_mode))
        with open(os.path.join(profiles, name)) as f:
            assert json.load(f)["traceEvents"]


DUMP = textwrap.dedent(
    """
    import logging, os, sys, time
    logging.basicConfig(level=logging.WARNING)
    from collectives import flight_recorder as fr
    trace_dir, copy_dir = sys.argv[1], sys.argv[2]
    os.environ["DISTTRAIN_TRACE_DIR"] = trace_dir
    fr.also_dump_to(copy_dir)
    fr.maybe_start_watch(0, "hostA")
    with open(os.path.join(trace_dir, "dump.request"), "w") as f:
        f.write("n1")
    dump = os.path.join(trace_dir, "rank0.dump.json")
    for _ in range(100):
        if os.path.exists(dump):
            break
        time.sleep(0.1)
    time.sleep(0.5)  # the copy comes right after the launcher's dump
    print("dumped" if os.path.exists(dump) else "no dump", flush=True)
    """
)


def _dump(trace_dir: str, copy_dir: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", DUMP, trace_dir, copy_dir], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.timeout(120)
def test_flight_recorder_dumps_never_go_through_a_planted_traces_entry(base):
    other = intruder()
    victim = _victim_dir(base)
    run = _shared_run_dir(base, other.pw_gid)
    launcher_dir = tempfile.mkdtemp(prefix="dt-trace-")  # the launcher's private directory
    try:
        traces = os.path.join(run, "traces")
        assert run_as(other, ["ln", "-s", victim, traces], timeout=30).returncode == 0
        proc = _dump(launcher_dir, traces)
        assert "dumped" in proc.stdout, proc.stdout + proc.stderr
        assert "rank 0@hostA: flight recorder: not writing into" in proc.stderr, proc.stderr
        assert _untouched(victim) and os.path.islink(traces)
        # Their directory: refused, nothing written in it.
        os.unlink(traces)
        assert run_as(other, ["mkdir", "-m", "777", traces], timeout=30).returncode == 0
        os.unlink(os.path.join(launcher_dir, "rank0.dump.json"))
        proc = _dump(launcher_dir, traces)
        assert "dumped" in proc.stdout and f"owned by uid {other.pw_uid}" in proc.stderr, proc.stderr
        assert os.listdir(traces) == []
        # Where it is ours to make: created 0700, the dump 0600.
        os.unlink(os.path.join(launcher_dir, "rank0.dump.json"))
        mine = os.path.join(base, "mine", "traces")
        proc = _dump(launcher_dir, mine)
        assert "dumped" in proc.stdout, proc.stdout + proc.stderr
        deadline = time.monotonic() + 5
        while not os.path.exists(os.path.join(mine, "rank0.dump.json")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stat.S_IMODE(os.lstat(mine).st_mode) == 0o700
        st = os.lstat(os.path.join(mine, "rank0.dump.json"))
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    finally:
        subprocess.run(["rm", "-rf", launcher_dir], check=False)

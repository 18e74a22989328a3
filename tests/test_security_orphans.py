"""Workers die with their launcher: SIGKILL the launcher (or a remote agent) while workers run,
and every worker is gone within seconds (no orphan keeps holding a device)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "cases", "security_worker.py")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"  # a zombie is dead
    except (OSError, IndexError):
        return False


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def _worker_pids(proc: subprocess.Popen, n: int, timeout: float = 60.0) -> dict[int, int]:
    """rank -> pid of the first ``n`` workers that report in on ``proc``'s stdout."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    pids, deadline = {}, time.monotonic() + timeout
    while len(pids) < n:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"only {len(pids)} of {n} workers started: {pids}") from None
        if m := re.search(r"rank=(\d+) attempt=\d+ pid=(\d+)", line):
            pids[int(m[1])] = int(m[2])
    return pids


def _gone_within(pids, seconds: float = 15.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _kill_all(pids) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.timeout(90)
def test_sigkill_of_the_local_launcher_takes_its_workers_with_it():
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "--nproc-per-node", "2", WORKER, "sleep"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    pids = []
    try:
        pids = list(_worker_pids(proc, 2).values())
        assert all(_ppid(p) == proc.pid for p in pids)  # the launcher is their agent
        proc.kill()  # as the OOM killer would: no handler runs
        proc.wait()
        assert _gone_within(pids) == [], "workers outlived their launcher"
    finally:
        proc.kill()
        _kill_all(pids)


@pytest.mark.timeout(90)
def test_sigkill_of_a_fanned_out_agent_takes_its_workers_and_the_launcher_stops_the_rest():
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "--hosts", "localhost:2", WORKER, "sleep"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pids = []
    try:
        pids = list(_worker_pids(proc, 2).values())
        agent = _ppid(pids[0])
        assert agent != proc.pid and _ppid(agent) == proc.pid  # launcher -> agent -> workers
        os.kill(agent, signal.SIGKILL)
        assert _gone_within(pids) == [], "workers outlived their agent"
        err = proc.stderr.read()  # until the launcher exits
        proc.wait(30)
        assert proc.returncode != 0 and "exited unexpectedly" in err, err
    finally:
        proc.kill()
        _kill_all(pids)


def _launch_two_hosts(hosts, *args):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": hosts.ifname}
    return hosts.popen(
        0,
        [sys.executable, "-m", "launcher.cli", *hosts.launcher_flags(), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.timeout(120)
def test_sigkill_of_the_remote_agent_and_of_the_launcher_leaves_no_worker_on_any_host(two_hosts):
    a, b = two_hosts.addrs
    # 1. The remote host's agent (started over ssh) is SIGKILLed: its workers go at once,
    #    and the launcher stops the first host's.
    proc = _launch_two_hosts(two_hosts, "--hosts", f"{a}:1,{b}:2", WORKER, "sleep")
    pids = {}
    try:
        pids = _worker_pids(proc, 3)
        remote_agent = _ppid(pids[1])
        assert remote_agent == _ppid(pids[2]) and remote_agent in two_hosts.pids(1)
        os.kill(remote_agent, signal.SIGKILL)
        assert _gone_within([pids[1], pids[2]]) == [], "remote workers outlived their agent"
        proc.stderr.read()
        assert proc.wait(60) != 0
        assert _gone_within(pids.values()) == []
    finally:
        proc.kill()
        _kill_all(pids.values())
    # 2. The launcher itself is SIGKILLed: no worker survives on either host.
    proc = _launch_two_hosts(two_hosts, "--hosts", f"{a}:1,{b}:1", WORKER, "sleep")
    pids = {}
    try:
        pids = _worker_pids(proc, 2)
        proc.kill()
        proc.wait()
        assert _gone_within(pids.values()) == [], "workers outlived the launcher"
    finally:
        proc.kill()
        _kill_all(pids.values())

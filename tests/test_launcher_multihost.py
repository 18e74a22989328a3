"""The launcher across hosts: network namespaces with a real sshd each (see tests/netns.py).

The launcher runs inside host 0; host 0's agent is local, host 1's is started over ssh.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "cases", "launcher_worker.py")
GLOO = os.path.join(ROOT, "tests", "cases", "launcher_gloo.py")


def launch_on(hosts, *args: str, timeout: float = 120.0):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": hosts.ifname}
    return hosts.run(
        0, [sys.executable, "-m", "launcher.cli", *hosts.launcher_flags(), *args], timeout=timeout, cwd=ROOT, env=env
    )


def _no_leftovers(hosts) -> None:
    deadline = time.monotonic() + 10
    while (hosts.pids(0) or hosts.pids(1)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert hosts.pids(0) == [] and hosts.pids(1) == [], "processes left behind on the hosts"


@pytest.mark.timeout(120)
def test_two_hosts_two_workers_allreduce_over_the_authenticated_store(two_hosts):
    a, b = two_hosts.addrs
    r = launch_on(two_hosts, "--hosts", f"{a}:2,{b}:2", GLOO)
    assert r.returncode == 0, r.stdout + r.stderr
    results = re.findall(r"^\[(\d)@([\d.]+)\] RESULT (.*)", r.stdout, re.M)
    assert sorted((int(rank), host) for rank, host, _ in results) == [(0, a), (1, a), (2, b), (3, b)]
    for _, _, line in results:
        assert '"world": 4' in line and '"sum": [10.0, 10.0, 10.0, 10.0]' in line and '"store": "AuthStore"' in line
    _no_leftovers(two_hosts)


@pytest.mark.timeout(120)
def test_worker_killed_on_the_remote_host_is_the_root_cause(two_hosts, tmp_path):
    a, b = two_hosts.addrs
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"# two namespace hosts\n{a} slots=2\n{b} slots=2\n")
    r = launch_on(two_hosts, "--hostfile", str(hostfile), WORKER, "kill", "3")
    assert r.returncode == 128 + signal.SIGKILL, r.stdout + r.stderr
    assert re.search(
        rf"\[ROOT CAUSE\] rank 3 \(local rank 1\) on host {re.escape(b)}, pid \d+: killed by signal "
        "SIGKILL",
        r.stderr,
    ), r.stderr
    assert "> killing myself" in r.stderr
    _no_leftovers(two_hosts)


@pytest.mark.timeout(120)
def test_remote_kill_with_max_restarts_restarts_every_host_and_finishes(two_hosts):
    a, b = two_hosts.addrs
    r = launch_on(two_hosts, "-np", "4", "-H", f"{a}:2,{b}:2", "--max-restarts", "1", WORKER, "kill", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"rank 2 on {b} failed (killed by signal SIGKILL); restarting worker group" in r.stderr
    for rank in range(4):  # every host's workers ran again
        assert f"rank={rank} world=4 local={rank % 2} attempt=1" in r.stdout
    _no_leftovers(two_hosts)


@pytest.mark.timeout(60)
def test_unreachable_host_is_a_clear_error_within_bounded_time(two_hosts):
    a, _ = two_hosts.addrs
    ghost = a.rsplit(".", 1)[0] + ".77"  # on the bridge's subnet, nobody there
    # ssh's ConnectTimeout bounds it; the subprocess timeout (45 s) fails the test if it hangs.
    r = launch_on(two_hosts, "--hosts", f"{a}:1,{ghost}:1", "--ssh-connect-timeout", "3", WORKER, timeout=45)
    assert r.returncode != 0
    assert f"cannot start the agent on host {ghost}" in r.stderr and "HINT" in r.stderr, r.stderr
    _no_leftovers(two_hosts)


@pytest.mark.timeout(60)
def test_misnamed_host_is_a_clear_error(two_hosts):
    a, _ = two_hosts.addrs
    r = launch_on(two_hosts, "--hosts", f"{a}:1,no-such-host.invalid:1", WORKER, timeout=45)
    assert r.returncode != 0
    assert "cannot start the agent on host no-such-host.invalid" in r.stderr, r.stderr
    _no_leftovers(two_hosts)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "launcher-killed"])
def test_stopping_the_launcher_stops_every_host(two_hosts, how):
    a, b = two_hosts.addrs
    p = two_hosts.popen(
        0,
        [sys.executable, "-m", "launcher.cli", *two_hosts.launcher_flags(), "--hosts", f"{a}:1,{b}:1", WORKER, "sleep"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        seen = set()
        for line in p.stdout:  # both hosts' workers are running
            seen |= set(re.findall(r"^\[(\d)@", line))
            if len(seen) == 2:
                break
        p.send_signal(how)
        code = p.wait(30)
        assert code == (128 + signal.SIGINT if how == signal.SIGINT else -signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    _no_leftovers(two_hosts)  # the remote agent saw its ssh stdin close and took its worker down


@pytest.mark.timeout(120)
def test_fan_out_with_nnodes_min_max_goes_on_without_a_killed_host(two_hosts, tmp_path):
    a, b = two_hosts.addrs
    worker = os.path.join(ROOT, "tests", "cases", "elastic_worker.py")
    argv = [sys.executable, "-m", "launcher.cli", *two_hosts.launcher_flags(), "--nnodes", "1:2"]
    argv += ["--hosts", f"{a}:1,{b}:1", "-x", f"GLOO_SOCKET_IFNAME={two_hosts.ifname}", worker, "25", str(tmp_path)]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": two_hosts.ifname}
    p = two_hosts.popen(0, argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if "step 2 world 2" in line:
                break
        for _ in range(50):  # the whole host: its agent, its workers, its ssh session
            pids = two_hosts.pids(1)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        out, err = p.communicate(timeout=90)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 0, out[-2000:] + err[-3000:]
    assert f"[0@{a}] step 24 world 1 attempt 1" in out, out[-2000:]
    assert f"the agent on host {b} is gone" in err
    assert re.search(rf"round 1: .*lost {re.escape(b)}; world 2 -> 1", err), err[-3000:]
    _no_leftovers(two_hosts)

"""The launcher across hosts: network namespaces with a real sshd each (see tests/netns.py).

The launcher runs inside host 0; host 0's agent is local, host 1's is started over ssh.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

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


@pytest.mark.timeout(150)
def test_horovod_elastic_worker_on_another_host_over_ssh_then_removed(two_hosts, tmp_path):
    """``--host-discovery-script`` naming two hosts: the driver (in host 0) starts the worker of
    host 1 over ssh (launcher/elastic_remote.py); the world trains over gloo across the hosts, then
    the script drops host 1: its worker leaves through its ssh session, host 0 goes on alone (over
    shm) and ends with one process's parameters."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "cases"))
    import hvd_elastic

    a, b = two_hosts.addrs
    hosts, log, params = tmp_path / "hosts.txt", tmp_path / "steps.jsonl", tmp_path / "params.json"
    hosts.write_text(f"{a}:1\n{b}:1\n")
    script = tmp_path / "hosts.sh"
    script.write_text(f"#!/bin/sh\ncat {hosts}\n")
    script.chmod(0o700)
    batches = 30
    argv = [sys.executable, "-m", "launcher.cli", *two_hosts.launcher_flags(), "--min-np", "1", "--max-np", "2"]
    argv += ["--host-discovery-script", str(script), "--discovery-interval", "0.3", "--elastic-timeout", "30"]
    argv += [os.path.join(ROOT, "tests", "cases", "hvd_elastic.py"), "--batches", str(batches)]
    argv += ["--steps-log", str(log), "--params-out", str(params)]
    env = {**os.environ, "PYTHONPATH": ROOT, "GLOO_SOCKET_IFNAME": two_hosts.ifname, "DISTTRAIN_HVD_TIMEOUT": "60"}
    p = two_hosts.popen(0, argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def steps() -> list[dict]:
        return [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []

    try:
        deadline = time.monotonic() + 90
        while not any(s["host"] == b and s["batch"] >= 5 for s in steps()):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[0] if p.poll() is not None else ""
            time.sleep(0.1)
        hosts.write_text(f"{a}:1\n")
        out, _ = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, out[-4000:]
    rows = steps()
    assert {s["size"] for s in rows if s["host"] == b} == {2}, rows
    # two machines: gloo; host 0 alone: shared memory
    assert {(s["size"], s["backend"]) for s in rows} == {(2, "torch"), (1, "shm")}, rows
    assert [s["size"] for s in rows if s["host"] == a][-1] == 1 and f"removed {b}" in out, out[-3000:]
    got = json.loads(params.read_text())
    for name, value in hvd_elastic.expected_params(batches).items():
        torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(value), rtol=1e-6, atol=1e-6)
    _no_leftovers(two_hosts)

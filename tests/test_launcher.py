"""The launcher on one machine: start, stop, the root-cause report, restarts, torchrun scripts, errors."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from launcher.errors import LaunchConfigError
from launcher.hostfile import HostSlots, parse_hostfile, parse_hosts, plan_nodes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "cases", "launcher_worker.py")
GLOO = os.path.join(ROOT, "tests", "cases", "launcher_gloo.py")


def launch(*args: str, timeout: float = 90.0, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.timeout(60)
def test_all_ranks_start_with_torchrun_env_and_prefixed_output(tmp_path):
    r = launch("--nproc-per-node", "3", "--log-dir", str(tmp_path), "--ranks", "0,2", WORKER, "ok")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\[0@\S+\] rank=0 world=3 local=0 attempt=0", r.stdout, re.M)
    assert "[2@" in r.stdout and "[1@" not in r.stdout  # console filter
    for rank in range(3):  # files get every rank
        assert f"rank={rank} world=3" in (tmp_path / f"rank_{rank}" / "stdout.log").read_text()


@pytest.mark.timeout(60)
def test_exit_code_3_is_reported_with_rank_host_and_stderr_tail():
    r = launch("--nproc-per-node", "2", WORKER, "exit3", "1")
    assert r.returncode == 3, r.stderr
    assert re.search(r"\[ROOT CAUSE\] rank 1 \(local rank 1\) on host \S+, pid \d+: exit code 3 at", r.stderr), r.stderr
    assert "> about to fail with 3" in r.stderr


@pytest.mark.timeout(60)
def test_sigkilled_worker_is_reported_by_signal_name():
    r = launch("--nproc-per-node", "2", WORKER, "kill", "0")
    assert r.returncode == 128 + signal.SIGKILL, r.stderr
    assert re.search(r"\[ROOT CAUSE\] rank 0 \(local rank 0\) on host \S+, pid \d+: killed by signal SIGKILL", r.stderr)
    assert "> killing myself" in r.stderr


@pytest.mark.timeout(60)
def test_traceback_comes_from_the_error_file_once():
    r = launch("--nproc-per-node", "2", WORKER, "raise", "1")
    assert r.returncode == 1, r.stderr
    report = r.stderr[r.stderr.index("ROOT CAUSE") :]
    assert "error: ValueError: boom on rank 1" in report
    assert report.count("Traceback (most recent call last)") == 1  # not repeated as a stderr tail
    assert "launcher/bootstrap.py" not in report  # the traceback starts in user code
    assert "> warming up" in report  # stderr before the traceback is kept


@pytest.mark.timeout(60)
def test_max_restarts_restarts_the_group_and_finishes():
    r = launch("--nproc-per-node", "2", "--max-restarts", "1", WORKER, "kill", "1")
    assert r.returncode == 0, r.stderr
    assert "restarting worker group (restart 1 of 1)" in r.stderr
    assert "rank=0 world=2 local=0 attempt=1" in r.stdout and "rank=1 world=2 local=1 attempt=1" in r.stdout


@pytest.mark.timeout(60)
def test_torchrun_script_runs_unchanged_over_the_authenticated_store():
    r = launch("--nproc-per-node", "2", GLOO)
    assert r.returncode == 0, r.stderr
    results = re.findall(r"RESULT (.*)", r.stdout)
    assert len(results) == 2
    for line in results:
        assert '"sum": [3.0, 3.0, 3.0, 3.0]' in line and '"store": "AuthStore"' in line, line


@pytest.mark.timeout(60)
def test_ctrl_c_stops_every_worker():
    p = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "--nproc-per-node", "2", WORKER, "sleep"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pids = []
    try:
        for line in p.stdout:
            pids += [int(m) for m in re.findall(r"pid=(\d+)", line)]
            if len(pids) == 2:
                break
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 128 + signal.SIGINT
    finally:
        p.kill()
        p.wait()
    time.sleep(0.2)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]


@pytest.mark.timeout(60)
def test_port_in_use_is_a_clear_error_naming_the_host():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = launch("--hosts", "localhost:1", "--rdzv-endpoint", f"localhost:{port}", WORKER, timeout=30)
    assert r.returncode == 2
    assert f"localhost:{port}" in r.stderr and "in use" in r.stderr and "HINT" in r.stderr


@pytest.mark.unit
def test_hostfile_and_host_lists(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# cluster\nnode1 slots=4\n\nnode2 slots=2  # small one\nnode3\n")
    assert parse_hostfile(str(f)) == [HostSlots("node1", 4), HostSlots("node2", 2), HostSlots("node3", None)]
    assert parse_hosts("a:2,b:3") == [HostSlots("a", 2), HostSlots("b", 3)]
    plans = plan_nodes(parse_hosts("a:2,b:3"), np=4)
    assert [(p.host, p.nproc, p.rank_offset) for p in plans] == [("a", 2, 0), ("b", 2, 2)]
    plans = plan_nodes(parse_hosts("a:2,b:2"), nproc_per_node=2)
    assert [(p.node_rank, p.rank_offset) for p in plans] == [(0, 0), (1, 2)]
    f.write_text("node1 slots=two\n")
    with pytest.raises(LaunchConfigError, match=r"hosts:1: slots must be a positive integer"):
        parse_hostfile(str(f))


@pytest.mark.unit
def test_too_few_slots_names_the_hosts():
    with pytest.raises(
        LaunchConfigError, match=r"-np 5 asks for more workers than the hosts have slots \(4: a:2, b:2\)"
    ):
        plan_nodes(parse_hosts("a:2,b:2"), np=5)
    with pytest.raises(LaunchConfigError, match=r"host b has 1 slot\(s\) but --nproc-per-node asks for 2"):
        plan_nodes(parse_hosts("a:2,b:1"), nproc_per_node=2)


def test_too_few_slots_on_the_command_line_exits_2_naming_the_host():
    r = launch("-np", "3", "-H", "localhost:2", WORKER, timeout=30)
    assert r.returncode == 2 and "localhost:2" in r.stderr


@pytest.mark.unit
def test_nproc_per_node_gpu_and_auto_count_the_visible_gpus(monkeypatch):
    import argparse

    from launcher.cli import nproc_arg

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2,3")
    assert nproc_arg("gpu") == 3 and nproc_arg("auto") == 3 and nproc_arg("5") == 5
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert nproc_arg("auto") == 1
    with pytest.raises(argparse.ArgumentTypeError, match="no GPU visible"):
        nproc_arg("gpu")
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number, 'gpu' or 'auto'"):
        nproc_arg("many")

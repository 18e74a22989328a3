"""The job id bound into the store's handshake (protocol 3): two jobs that reuse one secret stay apart.

Attack: job A runs torchrun-style on two "nodes" (two agents, no ``--run-id``: both derive the same
job id from the endpoint and the secret); before A's second node arrives, job B's agent, given the
same secret and A's endpoint, tries to join as node 1. A's store refuses it and logs a client of
another job; B's agent stops with a clear error; a hand-made client of job B is refused too; A's
own second node then joins and A finishes with exit 0 and the same output as without the attack.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest

from launcher.channel import StoreAuthError, derive_job_id
from launcher.store import StoreClient, StoreServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "cases", "launcher_worker.py")
SECRET = "5e0b9c2f7a1d4e8b3c6f9a0d2e5b8c1f4a7d0e3b6c9f2a5d8e1b4c7f0a3d6e9b"


def _node(port: int, rank: int, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "launcher.cli", "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1"]
    return argv + ["--rdzv-endpoint", f"127.0.0.1:{port}", *extra, WORKER, "ok"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.unit
def test_the_derived_job_id_agrees_across_nodes_and_differs_per_endpoint_and_secret():
    a = derive_job_id("10.0.0.1:29500", SECRET)
    assert a == derive_job_id("10.0.0.1:29500", SECRET) and re.fullmatch(r"job-[0-9a-f]{12}", a)
    assert a != derive_job_id("10.0.0.1:29501", SECRET) and a != derive_job_id("10.0.0.1:29500", SECRET[::-1])


@pytest.mark.unit
def test_a_client_of_another_job_is_refused_and_logged_a_client_of_this_job_is_served():
    with StoreServer(SECRET, job="job-a") as server:
        StoreClient(server.address, SECRET, timeout=5, job="job-a").set("k", "v")
        with pytest.raises(StoreAuthError, match="claims job 'job-b'"):
            StoreClient(server.address, SECRET, timeout=5, connect_timeout=5, job="job-b")
        with pytest.raises(StoreAuthError):  # no id at all is another job too
            StoreClient(server.address, SECRET, timeout=5, connect_timeout=5)
        deadline = time.monotonic() + 5
        while len(server.rejected) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        whys = [why for _, why in server.rejected]
        assert any("a client of job 'job-b' proved the secret, but this store serves job 'job-a'" in w for w in whys)
        assert StoreClient(server.address, SECRET, timeout=5, job="job-a").get("k") == b"v"


@pytest.mark.timeout(120)
def test_an_agent_of_another_job_with_the_same_secret_is_refused_and_the_job_finishes():
    port = _free_port()
    env = {**os.environ, "DISTTRAIN_JOB_SECRET": SECRET, "PYTHONPATH": ROOT}
    run = {"cwd": ROOT, "env": env, "text": True, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    head = subprocess.Popen(_node(port, 0), **run)
    try:
        deadline = time.monotonic() + 30
        while True:  # node 0 of job A hosts the store
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, "job A never opened its store"
                time.sleep(0.05)
        intruder = subprocess.run(_node(port, 1, "--run-id", "job-b"), timeout=60, **run)
        assert intruder.returncode != 0, intruder.stdout + intruder.stderr
        assert "claims job 'job-b'" in intruder.stderr and "HINT" in intruder.stderr, intruder.stderr
        assert "rank=" not in intruder.stdout  # it started no worker
        with pytest.raises(StoreAuthError):
            StoreClient(f"127.0.0.1:{port}", SECRET, timeout=5, connect_timeout=5, job="job-b")
        second = subprocess.run(_node(port, 1), timeout=90, **run)
        out, err = head.communicate(timeout=60)
    finally:
        head.kill()
        head.wait()
    assert head.returncode == 0 and second.returncode == 0, err + second.stderr
    lines = sorted(re.findall(r"rank=(\d) world=(\d) local=0 attempt=(\d)", out + second.stdout))
    assert lines == [("0", "2", "0"), ("1", "2", "0")], out + second.stdout
    job_a = derive_job_id(f"127.0.0.1:{port}", SECRET)
    refused = f"a client of job 'job-b' proved the secret, but this store serves job '{job_a}'"
    assert re.search(r"rejected connection from 127\.0\.0\.1:\d+: " + re.escape(refused), err), err[-2000:]
    assert SECRET not in out + err + intruder.stdout + intruder.stderr

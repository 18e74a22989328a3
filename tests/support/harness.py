"""The one harness every multi-rank test uses: real processes, a timeout, siblings killed on
the first failure, and a traceback per rank in the error.

    results = spawn("tests.cases.collective:allreduce_case", world_size=3, args={"n": 10})

``target`` is ``module:function``; each rank calls ``function(**args)`` with torchrun's
environment set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
DISTTRAIN_JOB_ID) and returns something JSON-serialisable; ``spawn`` returns the list
indexed by rank. Raises :class:`RankFailure` naming every failed rank with its output.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RankFailure(AssertionError):
    def __init__(self, message: str, returncodes: dict[int, int | None], outputs: dict[int, str]):
        super().__init__(message)
        self.returncodes, self.outputs = returncodes, outputs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, job_id: str, extra: dict | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "DISTTRAIN_JOB_ID": job_id,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "DISTTRAIN_UNAUTHENTICATED_STORE": "1",  # loopback test jobs may open a plain TCPStore
            "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def spawn(
    target: str,
    world_size: int,
    *,
    args: dict | None = None,
    env: dict | None = None,
    timeout: float = 120.0,
    expect_fail: bool = False,
) -> list:
    """Run ``target`` on ``world_size`` ranks; return per-rank results (or raise RankFailure)."""
    job_id = "t" + secrets.token_hex(4)
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="disttrain-test-")
    procs, logs = [], []
    for rank in range(world_size):
        out_path = os.path.join(workdir, f"rank{rank}.json")
        log = open(os.path.join(workdir, f"rank{rank}.log"), "w+")
        cmd = [sys.executable, "-m", "tests.support.rank_main", target, json.dumps(args or {}), out_path]
        procs.append(
            subprocess.Popen(
                cmd,
                env=rank_env(rank, world_size, port, job_id, env),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        logs.append(log)
    deadline = time.monotonic() + timeout
    failed_first: int | None = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if bad and failed_first is None:
                failed_first = bad[0]
                # Let the other ranks raise their own errors, then kill them. The grace outlasts the
                # 8 s op timeouts the dead-peer cases use, with room for a loaded machine.
                grace = time.monotonic() + 25.0
                while time.monotonic() < grace and any(p.poll() is None for p in procs):
                    time.sleep(0.05)
                break
            if all(c is not None for c in codes):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
    outputs = {}
    for rank, log in enumerate(logs):
        log.seek(0)
        outputs[rank] = log.read()
        log.close()
    codes = {r: p.returncode for r, p in enumerate(procs)}
    timed_out = time.monotonic() > deadline and failed_first is None and any(c != 0 for c in codes.values())
    if any(c != 0 for c in codes.values()):
        head = f"timed out after {timeout:.0f}s" if timed_out else f"rank {failed_first} failed first"
        msg = [f"{target} on {world_size} ranks: {head}"]
        for r in range(world_size):
            msg.append(f"--- rank {r} (exit {codes[r]}) ---\n{outputs[r][-4000:]}")
        raise RankFailure("\n".join(msg), codes, outputs)
    results = []
    for rank in range(world_size):
        with open(os.path.join(workdir, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results

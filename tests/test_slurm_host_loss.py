"""A node lost under SLURM's agent mode (tests/support/slurm_cluster.py: two slurmd nodes on this host):
``srun -N2`` starts one ``launcher.slurm.agent`` per node with ``--min-nodes 1``; every agent runs a
replica store, so with ``fault_tolerance.every=1`` the workers copy their state into both agents' memory.
Node n2's agent and worker are SIGKILLed mid-run (as a node that dies; srun, with ``--kill-on-bad-exit=0``,
leaves the other task running). The survivor's agent counts n2 lost after its heartbeat timeout, starts
a world of one, and its worker resumes from the copy in peer memory: nothing read from disk (no disk
checkpoint exists before the end), at most one step lost, and the run finishes.
"""

from __future__ import annotations

import os
import re
import signal
import sys

import pytest

from disttrain import config as config_mod
from tests.support.slurm_cluster import Step
from tests.test_fault_replicas import _config

RESUMED = r"resumed from peer memory at step (\d+) \(\d+ bytes\), 0 from disk \(restart 1\)"


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(i.decode(errors="replace").partition("=")[::2] for i in items if b"=" in i)


def _node_processes(marker: str, node_id: str) -> list[int]:
    """Our agent on SLURM node ``node_id`` (its command line names our config ``marker``) and its workers."""
    ours = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and "disttrain.worker" in cmd and _environ(int(name)).get("SLURM_NODEID") == node_id:
            ours.append(int(name))  # the agent (launcher.slurm.agent ... -m disttrain.worker CONFIG) and its worker
    return ours


@pytest.mark.timeout(180)
def test_a_node_lost_under_slurm_agents_resumes_from_peer_memory(slurm_cluster, tmp_path):
    ft = ["checkpoint.every=0", "fault_tolerance.every=1", "launch.backend=torch", "launch.timeout=60"]
    run_yaml = _config(tmp_path, "run", "ddp", 300, ft)
    assert config_mod.load(run_yaml).fault_tolerance.every == 1
    argv = ["srun", "-N2", "--ntasks-per-node=1", "--kill-on-bad-exit=0", sys.executable, "-u"]
    argv += ["-m", "launcher.slurm.agent", "--nproc-per-node", "1", "--min-nodes", "1", "--heartbeat-timeout", "2"]
    argv += ["--secret-dir", str(tmp_path), "--stop-grace", "5", "-m", "disttrain.worker", run_yaml]
    env = dict(slurm_cluster.env, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    step = Step(argv, env)
    try:
        step.wait_for(r"step 2[0-9]/", 120)
        victims = _node_processes(run_yaml, "1")
        assert len(victims) == 2, victims  # n2's agent and its worker
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        step.proc.wait(120)
    finally:
        step.stop()
    out = step.text()
    m = re.search(RESUMED, out)
    assert m, out[-4000:]
    s = int(m.group(1))
    done_before = max(int(x) for x in re.findall(r"\] step (\d+)/", out[: m.start()]))
    print(f"slurm node lost: resumed from peer memory at step {s} ({done_before - s} step(s) lost)")
    assert done_before - s <= 1, f"{done_before - s} steps lost"
    assert re.search(r"round 1: .*lost n2; world 2 -> 1", out), out[-4000:]
    assert "resumed from /" not in out and "done: 300 steps on 1 ranks" in out, out[-4000:]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["latest", "step_000300"]

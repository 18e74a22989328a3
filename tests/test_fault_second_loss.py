"""A second host lost while the survivors recover from the first, with peer replicas on: three
network-namespace hosts, ``--nnodes 1:3``, ``fault_tolerance.replicas=2`` (every host's agent holds
every copy, so any two may be lost). Host 2 is SIGKILLed mid-run; the moment host 0's agent logs the
first transition (its new workers are starting and resuming), host 1 is SIGKILLed too.

The outcome is defined: host 0 goes on alone (half of the round's two hosts is a quorum) from the
newest complete copy in its own agent's memory, with nothing read from disk and at most one step
lost, and ends where runs resized at the same steps through disk checkpoints end. (With one replica
the second loss takes the only other copy of a rank; tests/test_fault_recovery_plan.py and the stop
in ``Checkpointer.resume`` cover that outcome.)
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time

import pytest

from tests.support.netns import free_port_in, net_hosts
from tests.support.resized import run_until
from tests.test_fault_replicas import _config, _run
from tests.test_launcher_elastic import Node, _kill_host, _losses, _no_netns, _params

pytestmark = pytest.mark.skipif(_no_netns() is not None, reason=f"multi-host tests skipped: {_no_netns()}")
RESUMED = r"resumed from peer memory at step (\d+) \(\d+ bytes\), 0 from disk \(restart (\d+)\)"
TOL = 1e-5


def _keep_until(run_dir, step: int) -> None:
    ckpts = run_dir / "checkpoints"
    for name in os.listdir(ckpts):
        m = re.fullmatch(r"step_(\d+)", name)
        if m and int(m.group(1)) > step:
            shutil.rmtree(ckpts / name)
    (run_dir / "metrics.jsonl").write_text("")


def _lose_two(run_yaml: str) -> tuple[int, str, str]:
    """Three hosts; host 2 SIGKILLed at step 20-29, host 1 when host 0's agent logs the transition.
    Host 0's exit code, output and errors."""
    args = ["--heartbeat-timeout", "2", "-m", "disttrain.worker", run_yaml]
    with net_hosts(3, sshd=False) as hosts:
        port, secret = free_port_in(hosts, 0), secrets.token_hex(32)
        nodes = [Node(hosts, i, "1:3", port, secret, args) for i in range(3)]
        try:
            nodes[0].wait_for(r"step 2[0-9]/", 120)
            _kill_host(hosts, 2)
            deadline = time.monotonic() + 60
            while not re.search(r"round 1: ", "".join(nodes[0].err)):
                assert time.monotonic() < deadline and nodes[0].proc.poll() is None, nodes[0].text()
                time.sleep(0.02)
            _kill_host(hosts, 1)
            code = nodes[0].wait(180)
        finally:
            for n in nodes:
                n.kill()
    out, err = "".join(nodes[0].out), "".join(nodes[0].err)
    assert re.search(r"round 1: .*lost \S+; world 3 -> 2", err), out[-2000:] + err[-3000:]
    assert re.search(r"round 2: .*lost \S+; world 2 -> 1", err), out[-2000:] + err[-3000:]
    return code, out, err


@pytest.mark.timeout(300)
def test_a_second_host_lost_during_recovery_continues_from_memory(tmp_path):
    steps = 100
    ft = ["checkpoint.every=0", "fault_tolerance.every=1", "fault_tolerance.replicas=2"]
    run_yaml = _config(tmp_path, "run", "ddp", steps, ft)
    code, out, err = _lose_two(run_yaml)
    assert code == 0, out[-2000:] + err[-3000:]
    assert "resumed from /" not in out, "a disk checkpoint was read"
    resumes = list(re.finditer(RESUMED, out))
    last = resumes[-1]
    s = int(last.group(1))
    done_before = max(int(x) for x in re.findall(r"\] step (\d+)/", out[: last.start()]))
    assert done_before - s <= 1, f"{done_before - s} steps lost"
    # The world that wrote the copy: three ranks, unless round 1 trained and copied a step of its own.
    first = int(resumes[0].group(1))
    at_two = s > first and len(resumes) > 1
    print(
        f"lost host 2 at step {first}, host 1 during the recovery; resumed alone at step {s}; world 2 trained: {at_two}"
    )
    assert f"done: {steps} steps on 1 ranks" in out

    ref = tmp_path / "ref"
    if at_two:  # 3 ranks to step `first`, 2 ranks to `s`, then 1 (each part stopped where the next starts)
        ref_yaml = _config(tmp_path, "ref", "ddp", steps, [f"checkpoint.every={first}"])
        run_until(ref_yaml, 3, first)
        _keep_until(ref, first)
        ref_yaml = _config(tmp_path, "ref", "ddp", steps, ["checkpoint.every=1"])
        run_until(ref_yaml, 2, s)
    else:
        ref_yaml = _config(tmp_path, "ref", "ddp", steps, [f"checkpoint.every={s}"])
        run_until(ref_yaml, 3, s)
    _keep_until(ref, s)
    assert f"resumed from {ref / 'checkpoints'}/step_{s:06d}" in _run(ref_yaml, 1)
    (step_a, a), (step_b, b) = _params(str(tmp_path / "run")), _params(str(ref))
    assert step_a == step_b == steps and a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    la, lb = _losses(str(tmp_path / "run"), s), _losses(str(ref), s)
    assert sorted(la) == sorted(lb) == list(range(s + 1, steps + 1))
    worst_loss = max(abs(la[k] - lb[k]) / max(abs(lb[k]), 1e-12) for k in la)
    print(f"vs the runs resized at the same steps from disk: params {worst:.3g}, loss rel {worst_loss:.3g}")
    assert worst <= TOL and worst_loss <= 1e-3


@pytest.mark.timeout(200)
def test_a_second_loss_that_takes_a_ranks_only_copies_stops_without_a_disk_checkpoint(tmp_path):
    """fault_tolerance.replicas=1: host 1's copies live on hosts 1 and 2, both lost, and no disk
    checkpoint exists: host 0 stops naming the rank and step and what to set, instead of training
    again from step 0. (Had round 1 copied a step of its own, host 0 would hold all of it and go on
    from memory: the other defined outcome, accepted and reported.)"""
    run_yaml = _config(tmp_path, "run", "ddp", 100, ["checkpoint.every=0", "fault_tolerance.every=1"])
    code, out, err = _lose_two(run_yaml)
    resumed = [int(m.group(2)) for m in re.finditer(RESUMED, out)]
    if 2 in resumed:
        print("round 1 copied a step before host 1 was lost: host 0 went on from memory")
        assert code == 0, out[-2000:] + err[-3000:]
        return
    text = out + err
    assert code != 0, text[-4000:]
    assert re.search(r"no complete copy in peer memory \(the copy of rank 1 at step \d+ was held only by lost", text)
    assert "HINT: raise fault_tolerance.replicas" in text
    assert len(re.findall(r"\] step 1/", out)) == 1, "trained again from step 0"
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "latest"), "the stopped run wrote a checkpoint"

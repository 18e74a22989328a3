"""A lost host that comes back, with peer replicas on (``fault_tolerance.every=1``): network
namespaces as hosts, each started torchrun-style with ``--nnodes 1:2`` (tests/test_launcher_elastic.py).

Host 1 SIGKILLed mid-run: host 0 goes on alone from the copies in its agent's memory. Host 1 is then
started again with the same command: it joins at the next round, which starts at a step boundary (the
newest complete copy) and reads the state from the peers' memory, not from disk (the rejoining agent
holds nothing yet: the copies come from host 0's). The job ends at its original size equal to a run
that never lost a host (same global batch; the data position follows the step, so no sample is
skipped or seen twice).
"""

from __future__ import annotations

import os
import re
import secrets
import time

import pytest

from tests.support.netns import free_port_in, net_hosts
from tests.test_fault_replicas import _config, _run
from tests.test_launcher_elastic import Node, _kill_host, _losses, _no_netns, _params

pytestmark = pytest.mark.skipif(_no_netns() is not None, reason=f"multi-host tests skipped: {_no_netns()}")
RESUMED = r"resumed from peer memory at step (\d+) \((\d+) bytes\), 0 from disk \(restart {}\)"
# Parameters after the loss and the return against the run without them: the same steps on the same
# global batch; one stretch ran at dp1 instead of dp2, so float32 sums differ in order only.
TOL = 1e-4


@pytest.mark.timeout(300)
def test_a_host_that_comes_back_reads_peer_memory_and_the_job_equals_one_without_the_loss(tmp_path):
    steps = 200
    run_yaml = _config(tmp_path, "run", "ddp", steps, ["checkpoint.every=0", "fault_tolerance.every=1"])
    args = ["--heartbeat-timeout", "2", "-m", "disttrain.worker", run_yaml]
    with net_hosts(2, sshd=False) as hosts:
        port, secret = free_port_in(hosts, 0), secrets.token_hex(32)
        nodes = [Node(hosts, i, "1:2", port, secret, args) for i in range(2)]
        try:
            nodes[0].wait_for(r"step 2[0-9]/", 120)
            _kill_host(hosts, 1)
            nodes[0].wait_for(RESUMED.format(1), 60)
            back = time.monotonic()
            nodes.append(Node(hosts, 1, "1:2", port, secret, args))  # the same command, on the same host
            nodes[0].wait_for(RESUMED.format(2), 90)
            rejoined = time.monotonic() - back
            code = nodes[0].wait(120)
            code1 = nodes[2].wait(60)
        finally:
            for n in nodes:
                n.kill()
    out, err = "".join(nodes[0].out), "".join(nodes[0].err)
    assert code == 0 and code1 == 0, nodes[0].text() + nodes[2].text()
    m1, m2 = re.search(RESUMED.format(1), out), re.search(RESUMED.format(2), out)
    s1, s2, moved = int(m1.group(1)), int(m2.group(1)), int(m2.group(2))
    before = max(int(x) for x in re.findall(r"\] step (\d+)/", out[m1.end() : m2.start()]))
    print(f"lost at step {s1}; host 1 back after {rejoined:.1f}s at step {s2}: {moved} bytes from memory")
    assert before - s2 <= 1, f"{before - s2} steps lost at the rejoin"
    assert s2 > s1 and "resumed from /" not in out, "a disk checkpoint was read"
    assert re.search(r"round 1: .*lost \S+; world 2 -> 1", err), nodes[0].text()
    assert re.search(r"round 2: host \S+ came back .*joined \S+; world 1 -> 2", err), nodes[0].text()
    assert f"done: {steps} steps on 2 ranks" in out
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["latest", f"step_{steps:06d}"]

    ref_yaml = _config(tmp_path, "ref", "ddp", steps, ["checkpoint.every=0"])
    _run(ref_yaml, 2)
    (step_a, a), (step_b, b) = _params(str(tmp_path / "run")), _params(str(tmp_path / "ref"))
    assert step_a == step_b == steps and a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    la, lb = _losses(str(tmp_path / "run"), 0), _losses(str(tmp_path / "ref"), 0)
    assert sorted(la) == sorted(lb) == list(range(1, steps + 1))
    worst_loss = max(abs(la[k] - lb[k]) / max(abs(lb[k]), 1e-12) for k in la)
    print(f"vs the run without the loss: params {worst:.3g}, loss rel {worst_loss:.3g}")
    assert worst <= TOL and worst_loss <= 1e-3

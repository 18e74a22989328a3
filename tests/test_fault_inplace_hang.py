"""The hang watch after recovery in place: three network-namespace hosts, one worker each, ddp with
``fault_tolerance.recover: in_place`` and ``--hang-timeout 8`` (3 s fired during start-up when the whole
suite loaded the machine). Host 1 is SIGKILLed; host 2's worker process moves in place from rank 2 to
rank 1 of 2, then stops forever inside a step (tests/cases/hang_step.py, ``RANK`` 1 at its 60th call).
The one report must name the moved process by its new rank and its host (``rank 1@host 2``), not the
rank it had before the move: the agents watch the new round's ranks and the worker's flight recorder
beats and dumps under its new rank.
"""

from __future__ import annotations

import re
import secrets

import pytest

from tests.support.netns import free_port_in, net_hosts
from tests.test_fault_replicas import _config
from tests.test_hang_multihost import _hang_line
from tests.test_launcher_elastic import Node, _kill_host, _no_netns

pytestmark = pytest.mark.skipif(_no_netns() is not None, reason=f"multi-host tests skipped: {_no_netns()}")
MOVED = r"\[2@(\S+)\] in place \(pid \d+\): .*lost rank 1@\S+; now rank 1 of 2, attempt 1"


@pytest.mark.timeout(240)
def test_a_hang_after_a_move_in_place_names_the_new_rank_and_host(tmp_path):
    hang = ['loss.target="tests.cases.hang_step:step"', "loss.kwargs={hang_rank: 1, hang_call: 60}"]
    extra = ["checkpoint.every=0", "fault_tolerance.every=1", "fault_tolerance.recover=in_place", *hang]
    run_yaml = _config(tmp_path, "run", "ddp", 300, extra)
    args = ["--heartbeat-timeout", "2", "--hang-timeout", "8", "-m", "disttrain.worker", run_yaml]
    with net_hosts(3, sshd=False) as hosts:
        port, secret = free_port_in(hosts, 0), secrets.token_hex(32)
        nodes = [Node(hosts, i, "2:3", port, secret, args) for i in range(3)]
        try:
            nodes[0].wait_for(r"step ([5-9]|1[0-9])/", 120)
            _kill_host(hosts, 1)
            codes = [nodes[i].wait(120) for i in (0, 2)]
        finally:
            for n in nodes:
                n.kill()
    text = "".join(nodes[0].out + nodes[0].err + nodes[2].out + nodes[2].err)
    assert codes[0] != 0 and codes[1] != 0, text[-4000:]  # the hang stops the job
    moved = re.search(MOVED, text)
    assert moved, text[-4000:]
    assert text.count("disttrain: hang:") == 1, text[-4000:]  # one report for the job
    behind = [line for line in text.splitlines() if "BEHIND rank" in line]
    assert behind and behind[0].split("BEHIND ")[1].startswith(f"rank 1@{moved.group(1)}:"), text[-4000:]
    assert f"hang_step.py:{_hang_line()} in step" in behind[0], behind

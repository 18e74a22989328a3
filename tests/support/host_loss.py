"""Losing a host mid-run: the block the fault tests share (tests/test_fault_*.py).

Network namespaces as hosts (tests/support/netns.py), each node started torchrun-style with
``--nnodes 1:2`` by tests/test_launcher_elastic.py's harness; once host 0 logs ``at``, host 1 is
SIGKILLed (agent and workers, as a machine that dies), then host 0 is waited for: its resume
(``resumed``), then its exit. The caller asserts on what comes back.

    loss = lose_host_1(["-m", "disttrain.worker", run_yaml], resumed=RESUMED)
    assert loss.code == 0, loss.text
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from concurrent.futures import Future

from tests.support.netns import net_hosts
from tests.test_launcher_elastic import Node, _kill_host, _start


@dataclasses.dataclass
class HostLoss:
    """What host 0 did: its exit code, stdout and stderr, ``text`` (the tails of both, for messages),
    the seconds from the SIGKILL to the resume (to the exit when it never resumed; printed by the
    tests, not asserted: the machine's load decides it), and host 0's PIDs just before the SIGKILL
    and just after the resume."""

    code: int
    out: str
    err: str
    text: str
    resumed_after: float
    before: set[int]
    after: set[int]


def lose_host_1(
    args: list[str],
    *,
    resumed: str,
    nproc: int = 1,
    at: str = r"step 2[0-9]/",
    must_resume: bool = True,
    hosts: int = 2,
    beside: Callable[[object, Node], Future | None] | None = None,
) -> HostLoss:
    """Two nodes (``--heartbeat-timeout 2``, ``nproc`` workers each, the launcher's ``args``) on
    ``hosts`` namespace hosts; host 1 is SIGKILLed once host 0's output matches ``at``. With
    ``must_resume`` host 0 must match ``resumed`` within 60 s (else the test fails with its
    output); without, an exit instead is waited for too. ``beside(hosts, node0)``, called once the
    nodes start, may return a future (an attack from a third host) whose result is awaited after
    the resume, before host 0's exit (120 s)."""
    with net_hosts(hosts, sshd=False) as h:
        nodes = _start(h, "1:2", ["--heartbeat-timeout", "2", *args], nproc=nproc)
        try:
            pending = beside(h, nodes[0]) if beside is not None else None
            nodes[0].wait_for(at, 120)
            before = set(h.pids(0))  # the survivor's agent and workers
            killed = time.monotonic()
            _kill_host(h, 1)
            if must_resume:
                nodes[0].wait_for(resumed, 60)
            else:
                deadline = killed + 60
                while not re.search(resumed, "".join(nodes[0].out)) and nodes[0].proc.poll() is None:
                    assert time.monotonic() < deadline, "neither resumed nor stopped within 60s: " + nodes[0].text()
                    time.sleep(0.05)
            resumed_after = time.monotonic() - killed
            after = set(h.pids(0))
            if pending is not None:
                pending.result(60)
            code = nodes[0].wait(120)
        finally:
            for n in nodes:
                n.kill()
    return HostLoss(code, "".join(nodes[0].out), "".join(nodes[0].err), nodes[0].text(), resumed_after, before, after)

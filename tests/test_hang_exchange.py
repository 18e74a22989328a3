"""launcher.hang_exchange over a real store (TCP, the job's handshake): two agents, each watching its own
rank's trace directory, meet in the store; the head prints one report over both nodes naming the rank
behind with its host; the non-head prints nothing; a second alarm (hang_stop off) is a second report;
a node that never answers is named. The ranks are stand-ins that answer dump requests as the flight
recorder does (``collectives.flight_recorder``: a beat file, then ``rank<R>.dump.json`` with the nonce);
tests/test_hang_multihost.py runs the real thing across hosts."""

from __future__ import annotations

import json
import os
import threading

import pytest

from launcher.hang import HangWatch
from launcher.hang_exchange import HangExchange
from launcher.store import StoreClient, StoreServer

pytestmark = pytest.mark.unit
SECRET = "3c9e1f7a5b2d8c4e6a0f9b1d3e5c7a2f4b6d8e0a1c3f5b7d9e2a4c6f8b0d1e3a"


def _record(seq: int, end: float | None) -> dict:
    site = "train.py:10"
    return {"seq": seq, "op": "allreduce", "group": "world", "bytes": 64, "site": site, "start": 1.0 + seq, "end": end}


def _dump(rank: int, host: str, idle: bool) -> dict:
    records = [_record(s, 2.0 + s) for s in range(4)] + ([] if idle else [_record(4, None)])
    where = [{"file": "/job/train.py", "line": 42 if idle else 10, "function": "step"}]
    return {"rank": rank, "host": host, "records": records, "stacks": [{"thread": "T", "main": True, "frames": where}]}


class _Rank(threading.Thread):
    """Answers the watch's dump requests in ``directory`` until ``stop`` is set."""

    def __init__(self, directory: str, dump: dict, stop: threading.Event):
        super().__init__(daemon=True)
        self.dir, self.dump, self.stop = directory, dump, stop
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with open(os.path.join(directory, f"rank{dump['rank']}.beat"), "w") as f:
            f.write("4\n")

    def run(self) -> None:
        while not self.stop.wait(0.02):
            try:
                with open(os.path.join(self.dir, "dump.request")) as f:
                    nonce = f.read().strip()
            except FileNotFoundError:
                continue
            with open(os.path.join(self.dir, f"rank{self.dump['rank']}.dump.json"), "w") as f:
                json.dump({**self.dump, "nonce": nonce}, f)


@pytest.fixture
def job(tmp_path):
    stop = threading.Event()
    with StoreServer(SECRET, job="hx") as server:
        clients = [StoreClient(server.address, SECRET, timeout=10, job="hx") for _ in range(2)]
        for n, host in enumerate(("hostA", "hostB")):
            clients[0].set(f"agent/joined/{n}", host)
        dirs = [str(tmp_path / f"node{n}") for n in range(2)]
        ranks = [_Rank(dirs[0], _dump(0, "hostA", idle=False), stop), _Rank(dirs[1], _dump(1, "hostB", True), stop)]
        for r in ranks:
            r.start()
        watches = [HangWatch(dirs[n], [n], 0.3, ("hostA", "hostB")[n], dump_wait=1.0) for n in range(2)]
        yield clients, watches
        stop.set()
        for c in clients:
            c.close()


def _both(exchanges: list[HangExchange]) -> list:
    """Poll both agents side by side (each its own thread, as on two hosts) until each handled an alarm."""
    found: list = [None, None]

    def agent(n: int) -> None:
        while found[n] is None:
            found[n] = exchanges[n].poll()

    threads = [threading.Thread(target=agent, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return found


def test_the_head_prints_one_report_over_both_nodes_and_a_second_alarm_is_a_second_report(job):
    clients, watches = job
    exchanges = [HangExchange(clients[n], watches[n], 0, n, [0, 1], gather_wait=5.0) for n in range(2)]
    for alarm in range(2):  # hang_stop off: the agents watch afresh and the next stall is a new alarm
        head, other = _both(exchanges)
        assert other.text is None and other.behind == []
        assert head.behind == [1], head.text
        lines = head.text.splitlines()
        assert lines[0].startswith("disttrain: hang: no collective finished on host") and "rank 1 is behind" in lines[0]
        assert lines[1].startswith("  BEHIND rank 1@hostB: not in a collective; last allreduce#3"), head.text
        assert "/job/train.py:42 in step" in lines[1], head.text
        assert lines[2].startswith("  rank 0@hostA: waiting in allreduce#4"), head.text
        assert clients[0].check([f"hang/0/{alarm}/dumps/0", f"hang/0/{alarm}/dumps/1"])
    assert [e.alarm for e in exchanges] == [2, 2]


def test_a_node_that_sends_no_dumps_is_named_in_the_report(job):
    clients, watches = job
    head = HangExchange(clients[0], watches[0], 0, 0, [0, 1], gather_wait=0.5)
    found = None
    while found is None:  # node 1's agent never answers (stuck, or not watching)
        found = head.poll()
    assert "no dumps from node 1 (hostB) within 0.5s" in found.text, found.text
    assert "rank 0@hostA: waiting in allreduce#4" in found.text

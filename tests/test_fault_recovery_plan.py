"""Which copy the survivors resume from (``disttrain.fault.recovery.PeerStore.newest``), against real
replica stores on loopback (single process; the stores are the agents' servers, the client the workers').

- A host lost in the middle of a copy leaves chunks without a record, and the holder's list of complete
  steps still names the previous copy: that previous step is the one used.
- When the only holders of one rank's copy are gone (more hosts lost at once than ``replicas``), no
  step is whole: ``newest()`` is None and ``missing`` names the rank and step, so ``resume()`` stops
  with that message instead of starting again from step 0 (tests/test_fault_layouts.py runs the stop).
"""

from __future__ import annotations

import json
import secrets

import pytest

from disttrain.fault.recovery import PeerStore
from disttrain.fault.replica import chunk_key, record_key, steps_key
from launcher.replica_store import ReplicaStore, replica_secret

pytestmark = pytest.mark.unit
JOB = "job-plan"


@pytest.fixture
def stores(monkeypatch):
    job_secret = secrets.token_hex(32)
    servers = [ReplicaStore(replica_secret(job_secret, JOB), "127.0.0.1", job=JOB).start() for _ in range(2)]
    monkeypatch.setenv("DISTTRAIN_JOB_SECRET", job_secret)
    monkeypatch.setenv("DISTTRAIN_REPLICA_STORES", JOB + ";" + ",".join(s.address for s in servers))
    try:
        yield servers
    finally:
        for s in servers:
            s.close()


def _copy(peers: PeerStore, address: str, rank: int, step: int, held: list[int], record: bool = True) -> None:
    """What a rank's sender leaves on one holder: chunks, then the record, then the complete steps."""
    c = peers._client(address)
    c.set(chunk_key(rank, step, 0), b"x" * 64)
    if record:
        c.set(record_key(rank, step), json.dumps({"world": 2}).encode())
        c.set(steps_key(rank), json.dumps(held).encode())


def test_a_loss_in_the_middle_of_a_copy_uses_the_previous_complete_one(stores):
    a, b = (s.address for s in stores)
    peers = PeerStore("0@test", timeout=10)
    for holder in (a, b):  # rank 0's copies of steps 4 and 5 are whole everywhere
        _copy(peers, holder, 0, 4, [4])
        _copy(peers, holder, 0, 5, [4, 5])
    _copy(peers, a, 1, 4, [4])
    _copy(peers, a, 1, 5, [4], record=False)  # rank 1's host died while sending step 5
    assert peers.newest() == {"step": 4, "world": 2, "holders": [a, a]}
    assert peers.missing == (5, 1)
    peers.close()


def test_a_rank_whose_holders_are_all_lost_leaves_no_whole_step_and_names_it(stores):
    a, b = (s.address for s in stores)
    peers = PeerStore("0@test", timeout=5)
    _copy(peers, a, 0, 7, [7])
    _copy(peers, b, 1, 7, [7])
    peers.close()
    stores[1].close()  # the only holder of rank 1's copy is gone
    survivor = PeerStore("0@test", timeout=1)  # the lost one refuses: its connect retries this long
    assert survivor.newest() is None
    assert survivor.missing == (7, 1)
    survivor.close()


def _piece(name: str, n: int) -> dict:
    return {"name": name, "shape": [n], "box": [[0, n]], "flat": False}


def _record(peers: PeerStore, address: str, rank: int, step: int, pieces: list[dict]) -> None:
    c = peers._client(address)
    c.set(chunk_key(rank, step, 0), b"x" * 64)
    record = {"world": 2, "pieces": pieces, "tensors": ["b", "w"]}  # every record names the state's tensors
    c.set(record_key(rank, step), json.dumps(record).encode())
    held = json.loads(c.get(steps_key(rank))) if c.check([steps_key(rank)]) else []
    c.set(steps_key(rank), json.dumps([*held, step]).encode())


def test_each_rank_is_read_from_the_copy_with_the_host_local_boxes(stores):
    """ddp (disttrain.fault.plan): a rank's own host holds its copy with every replicated box, the other
    host the same step without them. After losing host b, rank 1's copy left on a has no pieces, rank 0's
    has them all: that step covers the state. Losing the copy that has the boxes makes it not cover."""
    a, b = (s.address for s in stores)
    peers = PeerStore("0@test", timeout=10)
    full = [_piece("w", 10), _piece("b", 3)]
    _record(peers, a, 0, 6, full)  # rank 0 on host a: its own copy, and its header on b
    _record(peers, b, 0, 6, [])
    _record(peers, b, 1, 6, full)  # rank 1 on host b
    _record(peers, a, 1, 6, [])
    assert peers.newest() == {"step": 6, "world": 2, "holders": [a, b]}
    _record(peers, a, 0, 7, [])  # a step whose host-local copies are gone everywhere: not whole
    _record(peers, b, 0, 7, [])
    _record(peers, a, 1, 7, [])
    _record(peers, b, 1, 7, [])
    peers.close()
    survivor = PeerStore("0@test", timeout=1, addresses=[a])
    assert survivor.newest() == {"step": 6, "world": 2, "holders": [a, a]}
    assert survivor.missing == (7, -1)
    survivor.close()

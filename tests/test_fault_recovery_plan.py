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

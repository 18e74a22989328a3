"""The replica store's door and the copies' placement (single process: a real server on loopback).

- A client needs the job secret *and* the job id: the job store's own secret, or the right secret
  under another job's id, fails the handshake before any request is read.
- One value over the cap and more bytes in all than ``max_bytes`` are refused; the store keeps
  what it had.
- Placement: each node's copies live on itself and the next ``replicas`` nodes, so losing any
  ``replicas`` nodes leaves a copy of every node's state.
"""

from __future__ import annotations

import itertools
import secrets

import pytest

from disttrain.fault.replica import targets
from launcher.replica_store import MAX_VALUE, ReplicaStore, replica_secret
from launcher.store import StoreAuthError, StoreClient, StoreError

pytestmark = pytest.mark.unit


@pytest.fixture
def store():
    job_secret = secrets.token_hex(32)
    server = ReplicaStore(
        replica_secret(job_secret, "job-a"), "127.0.0.1", max_bytes=MAX_VALUE + (4 << 20), job="job-a"
    ).start()
    try:
        yield server, job_secret
    finally:
        server.close()


def test_only_the_jobs_derived_secret_opens_the_store(store):
    server, job_secret = store
    for wrong in (job_secret, replica_secret(job_secret, "job-b"), replica_secret(secrets.token_hex(32), "job-a")):
        with pytest.raises(StoreAuthError):
            StoreClient(server.address, wrong, timeout=5, connect_timeout=5, prefix="", job="job-a").set(
                "c/0/steps", b"[1]"
            )
    with pytest.raises(StoreAuthError):  # the right derived secret, claimed for another job
        StoreClient(
            server.address, replica_secret(job_secret, "job-a"), timeout=5, connect_timeout=5, prefix="", job="job-b"
        ).set("c/0/steps", b"[1]")
    assert server.data == {}
    ok = StoreClient(
        server.address, replica_secret(job_secret, "job-a"), timeout=5, connect_timeout=5, prefix="", job="job-a"
    )
    ok.set("c/0/steps", b"[1]")
    assert ok.get("c/0/steps") == b"[1]"
    ok.close()


def test_values_and_total_bytes_are_capped(store):
    server, job_secret = store
    c = StoreClient(
        server.address, replica_secret(job_secret, "job-a"), timeout=10, connect_timeout=5, prefix="", job="job-a"
    )
    with pytest.raises(StoreError, match="over the limit"):
        c.set("big", b"\0" * (MAX_VALUE + 1))
    c.set("a", b"\0" * MAX_VALUE)
    with pytest.raises(StoreError, match="would pass the limit"):
        c.set("b", b"\0" * (8 << 20))
    assert sorted(server.data) == ["a"] and server.nbytes == len("a") + MAX_VALUE
    c.close()


@pytest.mark.parametrize("nodes,replicas", [(2, 1), (3, 1), (4, 2), (5, 3)])
def test_losing_any_replicas_nodes_leaves_a_copy_of_every_node(nodes, replicas):
    held = {n: set(targets(n, nodes, replicas)) for n in range(nodes)}
    assert all(n in held[n] and len(held[n]) == replicas + 1 for n in held)
    for lost in itertools.combinations(range(nodes), replicas):
        assert all(held[n] - set(lost) for n in held), f"losing {lost} leaves no copy of some node"

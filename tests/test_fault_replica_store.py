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


def test_fan_out_agents_are_told_the_replica_cap_and_it_survives_the_wire():
    """``--replica-bytes`` reaches every agent of a ``--hosts`` launch, through the line on its stdin."""
    from launcher import remote
    from launcher.cli import build_parser, job_from_args, worker_spec_from_args
    from launcher.hostfile import plan_nodes
    from launcher.job import node_spec

    ns = build_parser().parse_args(
        ["--hosts", "localhost:1,127.0.0.2:1", "--nnodes", "1:2", "--replica-bytes", "12345", "train.py"]
    )
    job = job_from_args(ns)
    plans = plan_nodes(job.hosts, np=job.np, nproc_per_node=job.nproc_per_node)
    nodes = [node_spec(job, p, len(plans), 2, "127.0.0.1", 29500, "127.0.0.1:29400") for p in plans]
    assert [n.replica_bytes for n in nodes] == [12345, 12345]
    spec = worker_spec_from_args(ns, 1)
    _, back, _ = remote.decode(remote.encode(spec, nodes[1], max_restarts=0, secret="s" * 64, env={}))
    assert back.replica_bytes == 12345 and back.min_nodes == 1 and back.node_rank == 1

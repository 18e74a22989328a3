"""Peer replicas' home: an in-memory store each agent of a multi-node job holds for its peers' workers.

Workers copy their state (``disttrain.fault``) into the :class:`ReplicaStore` of their own agent and
of ``fault_tolerance.replicas`` other hosts' agents. An agent outlives its workers' restarts, so when
a host is lost the survivors' new workers find the copies of every old rank in the surviving agents'
memory and resume from them without reading a checkpoint from disk.

Doors: the store is :class:`launcher.store.StoreServer` (the same mutual HMAC handshake and per-frame
MACs), under a secret derived from the job secret *and the job id* (:func:`replica_secret`), so a
client of another job, or of this job's rendezvous store, cannot speak to it; it binds only the
address this host uses to reach the job's store (never all interfaces); one value is at most
``MAX_VALUE`` bytes and all copies at most ``max_bytes`` (``--replica-bytes``): a worker over the cap
is refused, and the agent's memory stays bounded. Nothing in it is ever unpickled or evaluated:
values are the checkpoint writer's safetensors bytes and JSON records.

Who calls what: the agent calls :func:`start_replica_store` once (before joining the rendezvous,
so the address is in the job store when a round starts) and passes the round's addresses to its
workers in ``DISTTRAIN_REPLICA_STORES`` (members' order, which is the node order of ranks);
a worker calls :func:`replica_addresses_from_env` and :func:`connect_replica`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket

from .store import StoreServer
from .store_client import StoreClient

log = logging.getLogger(__name__)

ENV = "DISTTRAIN_REPLICA_STORES"  # "JOB;host:port,host:port,...": the job id bound, one store per node of the round
ADDRESS_KEY = "agent/replica/{node}"  # in the job store: each agent's replica store address
JOB_KEY = "agent/replica/job"  # the job id the stores' secret is bound to (the first agent's; nodes of a
# torchrun-style start draw their own ids unless --run-id is given)
MAX_VALUE = 32 << 20  # one piece of a copy (writers chunk below it)
DEFAULT_MAX_BYTES = 8 << 30


def replica_secret(job_secret: str, job_id: str) -> str:
    """The replica stores' secret: HMAC of the job id under the job secret (hex, 64 characters)."""
    return hmac.new(job_secret.encode(), b"disttrain-replica|" + job_id.encode(), hashlib.sha256).hexdigest()


class ReplicaStore(StoreServer):
    """One agent's store of its peers' copies. Bounded: ``max_bytes`` in all, ``MAX_VALUE`` a value."""

    def __init__(self, secret: str, host: str, *, max_bytes: int = DEFAULT_MAX_BYTES, job: str = ""):
        super().__init__(secret, host, 0, job=job)  # the job id is in the handshake too (launcher.channel)
        self.max_value, self.max_total = MAX_VALUE, max_bytes
        self.job_id = job


def local_address_towards(address: str) -> str:
    """The address of this host on the route to ``address`` (host:port); no packet is sent (UDP connect)."""
    host, _, port = address.rpartition(":")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host.strip("[]"), int(port)))
        return s.getsockname()[0]


def start_replica_store(
    job_client: StoreClient, job_store: str, secret: str, job_id: str, node_rank: int, max_bytes: int
) -> ReplicaStore:
    """Agent, once, before joining: open this host's replica store on the address that reaches the
    job's store and publish it there for the workers of every round. ``server.job_id`` is the id
    its secret is bound to, agreed through the job store."""
    bind = local_address_towards(job_store)
    bound = job_client.compare_set(JOB_KEY, "", job_id).decode()
    server = ReplicaStore(replica_secret(secret, bound), bind, max_bytes=max_bytes, job=bound).start()
    job_client.set(ADDRESS_KEY.format(node=node_rank), server.address)
    log.debug("node %d: replica store on %s (at most %d bytes)", node_rank, server.address, max_bytes)
    return server


def round_env(job_client: StoreClient, job_id: str, members: list[int]) -> str:
    """Agent, at a round's start: ``ENV``'s value for the members' workers (members' order)."""
    return job_id + ";" + ",".join(job_client.get(ADDRESS_KEY.format(node=n)).decode() for n in members)


def replica_addresses_from_env() -> list[str] | None:
    """Worker: the round's replica store addresses (index = node of the round), or None when the
    launcher runs none (a single node, another launcher)."""
    _, _, addrs = os.environ.get(ENV, "").partition(";")
    return [a for a in addrs.split(",") if a] or None


def connect_replica(address: str, timeout: float = 60.0) -> StoreClient:
    """Worker: a client of one replica store, authenticated with the job's derived secret."""
    from . import store_client

    secret = store_client._secret_taken or os.environ.get(store_client._SECRET_ENV)
    job_id = os.environ.get(ENV, "").partition(";")[0]
    if not secret:
        raise ConnectionError(
            f"{ENV} is set but the job secret is not\nHINT: start workers with disttrain launch, which passes both"
        )
    return StoreClient(
        address, replica_secret(secret, job_id), timeout=timeout, connect_timeout=timeout, prefix="", job=job_id
    )

"""A node's place in the job (:class:`NodeSpec`, what the agent is told) and the outcome of its run
(:class:`RunResult`), apart from the agent that acts on them (:mod:`launcher.agent`), as
:mod:`launcher.worker` keeps ``WorkerSpec`` apart from ``Worker``."""

from __future__ import annotations

import dataclasses
import socket

from .membership import HEARTBEAT_TIMEOUT, NodesRange
from .replica_store import DEFAULT_MAX_BYTES
from .report import Failure, root_cause


@dataclasses.dataclass
class NodeSpec:
    """This node's place in the job."""

    node_rank: int = 0
    nnodes: int = 1
    rank_offset: int = 0  # global rank of this node's local rank 0
    world_size: int | None = None  # default: nproc * nnodes
    host: str = dataclasses.field(default_factory=socket.gethostname)
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    job_id: str = "local"
    store: str | None = None  # host:port of the job's store; None: a lone node hosts its own
    secret: str | None = None  # default: DISTTRAIN_JOB_SECRET, else a fresh one (lone node only)
    host_store: bool = False  # this agent opens the store at ``store``'s port (manual multi-node, node 0)
    rdzv_timeout: float = 120.0  # how long agents wait for each other
    min_nodes: int | None = None  # --nnodes MIN:MAX's MIN: after a host is lost, go on with at least this many
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT  # a peer silent this long is lost
    replica_bytes: int = DEFAULT_MAX_BYTES  # the agent holds peers' copies up to this (0: none)
    replica_stores: bool = False  # hold copies in a job that cannot shrink too (SLURM: restarts, requeues)

    @property
    def nodes_range(self) -> NodesRange:
        return NodesRange(self.min_nodes or self.nnodes, self.nnodes)

    @property
    def holds_replicas(self) -> bool:
        """Whether this node's agent runs a replica store (:mod:`launcher.replica_store`): a job of
        several nodes that may go on without one (``min_nodes``) or asks for it (``replica_stores``)."""
        return self.nnodes > 1 and self.replica_bytes > 0 and (self.replica_stores or self.nodes_range.elastic)


@dataclasses.dataclass
class RunResult:
    exit_code: int
    failures: list[Failure]
    restarts: int

    @property
    def root_cause(self) -> Failure | None:
        return root_cause(self.failures) if self.failures else None

"""Losing a host without losing the run: peer replicas in host memory (``replica``) and the
recovery from them (``recovery``), what each copy holds and where (``plan``), the layouts a smaller world falls back to (``layout``), configured by the ``fault_tolerance:`` section.

:func:`maybe_build_fault_tolerance` is called by the session after the checkpointer is built: it
returns the replica callback (placed after the checkpointer) and hands the checkpointer the peers'
copies, which its ``resume()`` prefers to the disk when they are at least as new.
"""

from __future__ import annotations

import logging

from .layout import LayoutError, maybe_fall_back
from .recovery import MemoryReader, PeerStore, maybe_peer_store
from .replica import PeerReplicas

log = logging.getLogger(__name__)

__all__ = [
    "LayoutError",
    "MemoryReader",
    "PeerReplicas",
    "PeerStore",
    "maybe_build_fault_tolerance",
    "maybe_fall_back",
]


def maybe_build_fault_tolerance(cfg, comm, checkpointer) -> PeerReplicas | None:
    """Every rank, once: the replica callback for ``cfg`` (the ``fault_tolerance`` section), or None
    when it is off or the launcher runs no replica stores. ``checkpointer``: the run's Checkpointer."""
    if not cfg.every:
        return None
    peers = maybe_peer_store(comm.env.where, comm.timeout)
    if peers is None:
        log.info("rank %s: fault_tolerance.every is set but the launcher runs no replica stores", comm.env.where)
        return None
    if checkpointer is None:
        log.warning(
            "rank %s: fault_tolerance needs checkpoint.enabled (recovery goes through the checkpoint loader); "
            "no replicas are made",
            comm.env.where,
        )
        return None
    checkpointer.peers = peers
    return PeerReplicas(cfg.every, cfg.replicas, comm, peers.addresses, cfg.target_overhead)

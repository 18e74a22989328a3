"""Listeners of a one-host job stay on loopback.

When every rank of a job is on this host, nothing it opens needs to be reachable from the
network, yet the transports we drive bind what the host name resolves to (a routable address
on a cluster node): gloo's device, NCCL's bootstrap, MPICH's UCX and libfabric netmods,
Horovod's gloo controller. :func:`pin_one_host_job` points each at the loopback interface
through the variable the library reads, before it initialises, unless the user set that
variable already (their choice wins). Called by each backend's ``create`` on every rank.
"""

from __future__ import annotations

import os

from ..env import DistEnv

LOOPBACK = "lo"
# The variable each library reads for the interface (or device list) its sockets bind to.
INTERFACE_VARS = (
    "GLOO_SOCKET_IFNAME",  # torch.distributed gloo (and its new groups)
    "NCCL_SOCKET_IFNAME",  # NCCL's bootstrap and socket transport
    "UCX_NET_DEVICES",  # MPICH ch4:ucx (pip's MPICH picks UCX first)
    "FI_TCP_IFACE",  # MPICH ch4:ofi, libfabric's tcp provider
    "FI_SOCKETS_IFACE",  # ... and its sockets provider
    "HOROVOD_GLOO_IFACE",  # Horovod's gloo controller
)


def one_host(env: DistEnv) -> bool:
    return env.local_world_size == env.world_size


def pin_one_host_job(env: DistEnv) -> dict[str, str]:
    """Set each interface variable to loopback when the job has one host and the variable is
    unset; returns what was set (nothing for a job on several hosts)."""
    if not one_host(env):
        return {}
    pinned = {}
    for var in INTERFACE_VARS:
        if not os.environ.get(var):
            os.environ[var] = pinned[var] = LOOPBACK
    return pinned

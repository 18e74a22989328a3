"""The contract between launcher and workers: environment variables, torchrun's names plus ours.

Workers never import ``launcher`` to learn where they are; they read these variables, so
the same worker runs under torchrun, srun and mpirun, and torchrun scripts run here.
"""

from __future__ import annotations

import dataclasses
import os
import socket

# torchrun's names (torch.distributed.elastic) ------------------------------------------
RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE = "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"
GROUP_RANK, MASTER_ADDR, MASTER_PORT = "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"
TORCHELASTIC_RESTART_COUNT, TORCHELASTIC_MAX_RESTARTS = "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS"
TORCHELASTIC_RUN_ID, TORCHELASTIC_ERROR_FILE = "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE"
# ours ---------------------------------------------------------------------------------
JOB_ID = "DISTTRAIN_JOB_ID"  # unique per job; names shared-memory segments, log dirs
HOST = "DISTTRAIN_HOST"  # the host name the launcher knows this node by (for [rank@host])
NODE_RANK, NNODES = "DISTTRAIN_NODE_RANK", "DISTTRAIN_NNODES"
RESTART_COUNT = "DISTTRAIN_RESTART_COUNT"  # 0 on the first attempt; the trainer resumes when > 0
ERROR_FILE = "DISTTRAIN_ERROR_FILE"  # where a worker writes its traceback as JSON on an uncaught exception
STORE = "DISTTRAIN_STORE"  # host:port of the authenticated rendezvous store, when the launcher runs one
SECRET = "DISTTRAIN_JOB_SECRET"  # the job secret for the store; never on a command line or in a log
# what horovodrun sets, so Horovod scripts (and disttrain.horovod) find their place -----------
HOROVOD_RANK, HOROVOD_SIZE = "HOROVOD_RANK", "HOROVOD_SIZE"
HOROVOD_LOCAL_RANK, HOROVOD_LOCAL_SIZE = "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"
HOROVOD_CROSS_RANK, HOROVOD_CROSS_SIZE = "HOROVOD_CROSS_RANK", "HOROVOD_CROSS_SIZE"  # node index, node count
HOROVOD_HOSTNAME = "HOROVOD_HOSTNAME"


@dataclasses.dataclass(frozen=True)
class WorkerPlace:
    """Where one worker sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int = 0
    nnodes: int = 1


def worker_env(
    place: WorkerPlace,
    *,
    job_id: str,
    host: str,
    master_addr: str,
    master_port: int,
    restart_count: int,
    max_restarts: int,
    error_file: str,
    store: str | None = None,
    secret: str | None = None,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """The full environment of one worker process."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            RANK: str(place.rank),
            LOCAL_RANK: str(place.local_rank),
            WORLD_SIZE: str(place.world_size),
            LOCAL_WORLD_SIZE: str(place.local_world_size),
            GROUP_RANK: str(place.node_rank),
            "ROLE_RANK": str(place.rank),
            "ROLE_WORLD_SIZE": str(place.world_size),
            MASTER_ADDR: master_addr,
            MASTER_PORT: str(master_port),
            TORCHELASTIC_RESTART_COUNT: str(restart_count),
            TORCHELASTIC_MAX_RESTARTS: str(max_restarts),
            TORCHELASTIC_RUN_ID: job_id,
            TORCHELASTIC_ERROR_FILE: error_file,
            JOB_ID: job_id,
            HOST: host,
            NODE_RANK: str(place.node_rank),
            NNODES: str(place.nnodes),
            RESTART_COUNT: str(restart_count),
            ERROR_FILE: error_file,
            "PYTHONUNBUFFERED": "1",
            HOROVOD_RANK: str(place.rank),
            HOROVOD_SIZE: str(place.world_size),
            HOROVOD_LOCAL_RANK: str(place.local_rank),
            HOROVOD_LOCAL_SIZE: str(place.local_world_size),
            HOROVOD_CROSS_RANK: str(place.node_rank),
            HOROVOD_CROSS_SIZE: str(place.nnodes),
            HOROVOD_HOSTNAME: host,
        }
    )
    # Like torchrun: several workers on a node share its cores, so one thread each unless told.
    if place.local_world_size > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    if store:
        env[STORE] = store
    if secret:
        env[SECRET] = secret
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]

"""Where am I? Rank and world size read from whatever started this process.

Order of precedence: our launcher and torchrun (``RANK``/``WORLD_SIZE``...), then MPI
launchers (MPICH/Hydra ``PMI_RANK``, Open MPI ``OMPI_COMM_WORLD_RANK``), then a single
process. Nothing here opens a connection.

SLURM's variables are not read here: their one reader is ``launcher.slurm.place``, and an
srun-started worker passes through ``launcher.setup_slurm_worker()`` (``disttrain.init`` and
``disttrain.worker`` call it), which exports torchrun's names, so this module sees the same
place the launcher computed (ARCHITECTURE.md, "SLURM"). A task of a multi-task srun step that
did not pass through it is refused with that HINT rather than guessed at.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping

from .errors import CollectivesError


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None
    source: str  # "launcher", "torchrun", "mpi" or "single"
    host: str = dataclasses.field(default_factory=socket.gethostname)

    @property
    def where(self) -> str:
        return f"{self.rank}@{self.host}"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; the CPU count where there is none). Ranks on one
    host beyond this number share cores, and waiting must then hand the core over rather than spin."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise CollectivesError(f"environment variable {key}={env[key]!r} is not an integer") from None


def read_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read this process's place in the job from ``env`` (default ``os.environ``)."""
    env = os.environ if env is None else env
    host = env.get("DISTTRAIN_HOST") or socket.gethostname()
    port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else None
    addr = env.get("MASTER_ADDR")
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        source = "launcher" if "DISTTRAIN_JOB_ID" in env else "torchrun"
    elif "PMI_RANK" in env or "OMPI_COMM_WORLD_RANK" in env:
        if "PMI_RANK" in env:
            rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
            local_rank = _int(env, "MPI_LOCALRANKID") if "MPI_LOCALRANKID" in env else rank
            local_world = _int(env, "MPI_LOCALNRANKS") if "MPI_LOCALNRANKS" in env else world
        else:
            rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
            local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
            local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
        source = "mpi"
    elif env.get("SLURM_PROCID") and env.get("SLURM_NTASKS", "1") != "1":
        raise CollectivesError(
            f"srun started this process as task {env['SLURM_PROCID']} of {env['SLURM_NTASKS']}, but nothing "
            "exported its place (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)\n"
            "HINT: call launcher.setup_slurm_worker() before collectives.init() (disttrain.init does), or "
            "start the script with `srun ... python -m launcher.slurm.agent --nproc-per-node N SCRIPT`"
        )
    else:
        rank, world, local_rank, local_world, source = 0, 1, 0, 1, "single"
    if not 0 <= rank < world:
        raise CollectivesError(f"rank {rank} is outside world size {world} (read from {source} environment)")
    return DistEnv(rank, world, local_rank, local_world, addr, port, source, host)

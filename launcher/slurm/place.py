"""One srun task's place in its job, from SLURM's variables; the store's address; our contract.

``read_slurm_env()`` turns ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS``/
``SLURM_STEP_NODELIST``/``SLURM_TASKS_PER_NODE``/``SLURM_JOB_ID``/``SLURM_RESTART_COUNT``
(and the array ids) into a :class:`SlurmPlace`, checking that they agree with each other.
``store_endpoint()`` gives the address and port of the job's store (the first node, a port
derived from the job id); ``contract_env()`` the variables one worker gets (torchrun's
names plus ours). Pure functions of the environment, apart from name resolution.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping

from .. import environment as E
from .errors import SlurmEnvError
from .hostlist import expand_hostlist, expand_tasks_per_node, scontrol_hostnames

PORT_OVERRIDE = "DISTTRAIN_MASTER_PORT"  # pin the store port when the derived one collides
ADDR_OVERRIDE = "DISTTRAIN_MASTER_ADDR"  # the first node's address, when its name does not resolve
PORT_BASE, PORT_SPAN = 12000, 16000  # derived ports stay below Linux's ephemeral range (32768+)


@dataclasses.dataclass(frozen=True)
class SlurmPlace:
    """One srun task's place in its job step, read from SLURM's variables."""

    job_id: str
    step_id: str
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    nodes: tuple[str, ...]
    restart_count: int
    array_job_id: str | None = None
    array_task_id: str | None = None

    @property
    def nnodes(self) -> int:
        return len(self.nodes)

    @property
    def first_node(self) -> str:
        return self.nodes[0]

    @property
    def where(self) -> str:
        host = self.nodes[self.node_rank] if self.node_rank < len(self.nodes) else "?"
        return f"rank {self.rank}@{host} (job {self.job_id})"


def in_slurm(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("SLURM_JOB_ID"))


def restart_count(env: Mapping[str, str] | None = None) -> int:
    """How many times SLURM requeued this job (``SLURM_RESTART_COUNT``; 0 on the first attempt)."""
    return _int(os.environ if env is None else env, "SLURM_RESTART_COUNT", 0)


def array_task_id(env: Mapping[str, str] | None = None) -> str | None:
    """This job's task id in a job array (``SLURM_ARRAY_TASK_ID``), None outside an array."""
    return (os.environ if env is None else env).get("SLURM_ARRAY_TASK_ID") or None


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        if default is None:
            raise SlurmEnvError(
                f"{key} is not set. HINT: start workers with srun inside an allocation "
                "(sbatch/salloc), one task per worker"
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise SlurmEnvError(f"{key}={raw!r} is not an integer") from None


def read_slurm_env(env: Mapping[str, str] | None = None, cross_check: bool = False) -> SlurmPlace:
    """This task's place from SLURM's variables; raises :class:`SlurmEnvError` if they disagree."""
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        raise SlurmEnvError(
            "SLURM_JOB_ID is not set: not inside a SLURM job. HINT: submit with `disttrain "
            "submit` or run under srun/sbatch/salloc"
        )
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    nodes = expand_hostlist(nodelist)
    if cross_check:
        theirs = scontrol_hostnames(nodelist)
        if theirs is not None and theirs != nodes:
            raise SlurmEnvError(f"node list {nodelist!r}: our parser gives {nodes} but scontrol gives {theirs}")
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS", _int(env, "SLURM_NPROCS", -1))
    if world < 0:
        raise SlurmEnvError("SLURM_NTASKS is not set. HINT: start workers with srun, one task per worker")
    local_rank, node_rank = _int(env, "SLURM_LOCALID", 0), _int(env, "SLURM_NODEID", 0)
    nnodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", len(nodes)))
    where = f"rank {rank} (job {job_id})"
    if nnodes != len(nodes):
        raise SlurmEnvError(f"{where}: SLURM says {nnodes} nodes but node list {nodelist!r} names {len(nodes)}")
    if not 0 <= rank < world:
        raise SlurmEnvError(f"{where}: SLURM_PROCID={rank} is outside SLURM_NTASKS={world}")
    if not 0 <= node_rank < nnodes:
        raise SlurmEnvError(f"{where}: SLURM_NODEID={node_rank} is outside the {nnodes} node(s) of {nodelist!r}")
    per_node_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node_spec:
        per_node = expand_tasks_per_node(per_node_spec)
        if len(per_node) != nnodes or sum(per_node) != world:
            raise SlurmEnvError(
                f"{where}: tasks per node {per_node_spec!r} do not add up to SLURM_NTASKS={world} on {nnodes} node(s)"
            )
        local_world = per_node[node_rank]
    elif world % nnodes == 0:  # tasks per node unset (not srun's doing): an even split is the only reading
        local_world = world // nnodes
    else:
        raise SlurmEnvError(
            f"{where}: {world} task(s) on {nnodes} node(s) and neither SLURM_STEP_TASKS_PER_NODE nor "
            "SLURM_TASKS_PER_NODE says how they are spread. HINT: start the workers with srun, which sets them"
        )
    if not 0 <= local_rank < local_world:
        raise SlurmEnvError(f"{where}: SLURM_LOCALID={local_rank} is outside the node's {local_world} task(s)")
    return SlurmPlace(
        job_id=job_id,
        step_id=env.get("SLURM_STEP_ID", "0"),
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        node_rank=node_rank,
        nodes=tuple(nodes),
        restart_count=_int(env, "SLURM_RESTART_COUNT", 0),
        array_job_id=env.get("SLURM_ARRAY_JOB_ID") or None,
        array_task_id=env.get("SLURM_ARRAY_TASK_ID") or None,
    )


def check_against_config(
    place: SlurmPlace, nodes: int | None, ntasks_per_node: int | None, source: str = "the config"
) -> None:
    """Raise when the job SLURM started is not the one the config describes."""
    if nodes is not None and nodes != place.nnodes:
        raise SlurmEnvError(
            f"{place.where}: {source} asks for slurm.nodes={nodes} but SLURM started {place.nnodes} "
            f"node(s) ({','.join(place.nodes)}). HINT: srun -N{nodes}, or fix slurm.nodes"
        )
    if ntasks_per_node is not None:
        want = ntasks_per_node * (nodes or place.nnodes)
        if want != place.world_size:
            raise SlurmEnvError(
                f"{place.where}: {source} gives a world size of {want} ({ntasks_per_node} per node) "
                f"but SLURM started {place.world_size} task(s). HINT: srun --ntasks-per-node="
                f"{ntasks_per_node}, or fix slurm.ntasks_per_node"
            )


# -- the store's address, and our contract ---------------------------------------------
def derive_port(job_id: str, step_id: str = "0") -> int:
    """The store port: the same on every node of a step, different across steps of the job."""
    digits = int(re.sub(r"\D", "", job_id) or "0")
    step = int(step_id) if step_id.isdigit() else 0
    return PORT_BASE + (digits * 31 + step * 2) % PORT_SPAN


def node_address(name: str, timeout: float = 10.0) -> str:
    """An address other nodes can reach ``name`` at: the name if it resolves, else its NodeAddr."""
    try:
        socket.getaddrinfo(name, None)
        return name
    except OSError:
        pass
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "node", name, "-o"], capture_output=True, text=True, timeout=timeout
            ).stdout
            m = re.search(r"\bNodeAddr=(\S+)", out)
            if m:
                return m.group(1)
        except (OSError, subprocess.TimeoutExpired):
            pass
    raise SlurmEnvError(
        f"first node {name!r} does not resolve and scontrol gives no NodeAddr for it. HINT: export "
        f"{ADDR_OVERRIDE}=<its address> in the batch script"
    )


def store_endpoint(place: SlurmPlace, env: Mapping[str, str] | None = None) -> tuple[str, int]:
    """(address, port) of the job's store on the first node: ``DISTTRAIN_MASTER_ADDR`` and
    ``DISTTRAIN_MASTER_PORT`` when set, else the first node's address and the derived port.
    Every task of a step computes the same answer without talking to the others."""
    env = os.environ if env is None else env
    addr = env.get(ADDR_OVERRIDE) or node_address(place.first_node)
    raw = env.get(PORT_OVERRIDE)
    if not raw:
        return addr, derive_port(place.job_id, place.step_id)
    try:
        return addr, int(raw)
    except ValueError:
        raise SlurmEnvError(f"{PORT_OVERRIDE}={raw!r} is not a port number") from None


def job_tag(place: SlurmPlace) -> str:
    """Our job id for one attempt: a requeued attempt never meets shared-memory names a killed one left."""
    return f"slurm-{place.job_id}.{place.step_id}.r{place.restart_count}"


def contract_env(place: SlurmPlace, master_addr: str, store_port: int, secret: str) -> dict[str, str]:
    """Our variables for one srun-started worker (torchrun's names plus ours)."""
    return {
        E.RANK: str(place.rank),
        E.LOCAL_RANK: str(place.local_rank),
        E.WORLD_SIZE: str(place.world_size),
        E.LOCAL_WORLD_SIZE: str(place.local_world_size),
        E.GROUP_RANK: str(place.node_rank),
        E.MASTER_ADDR: master_addr,
        E.MASTER_PORT: str(store_port + 1),
        E.TORCHELASTIC_RESTART_COUNT: str(place.restart_count),
        E.RESTART_COUNT: str(place.restart_count),
        E.JOB_ID: job_tag(place),
        E.HOST: place.nodes[place.node_rank],
        E.NODE_RANK: str(place.node_rank),
        E.NNODES: str(place.nnodes),
        E.STORE: f"{master_addr}:{store_port}",
        E.SECRET: secret,
    }

"""SLURM's environment read into ours: workers started by ``srun`` need no other launcher.

    srun -N2 --ntasks-per-node=2 python -m disttrain.worker run.yaml      # one task per worker
    srun -N2 --ntasks-per-node=1 python -m launcher.slurm_agent --nproc-per-node 2 -m disttrain.worker run.yaml

``read_slurm_env()`` turns ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS``/
``SLURM_STEP_NODELIST``/``SLURM_TASKS_PER_NODE``/``SLURM_JOB_ID``/``SLURM_RESTART_COUNT``
(and the array ids) into a :class:`SlurmPlace`, checking that they agree with each other.
``setup_worker()`` (called by every srun-started worker before it connects) exports our
contract (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` =
first node, ``MASTER_PORT`` derived from the job id, ``DISTTRAIN_RESTART_COUNT`` =
``SLURM_RESTART_COUNT``) and, on rank 0 (which block distribution puts on the first node),
opens the job's authenticated store. The job secret comes from ``DISTTRAIN_JOB_SECRET``,
else the file named by ``DISTTRAIN_JOB_SECRET_FILE`` (the sbatch templates write one,
mode 0600), else rank 0 writes one under ``secret_dir`` (the run directory, on the
shared filesystem) and the others wait for it. Never imports torch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping

from . import environment as E
from .errors import LauncherError

log = logging.getLogger(__name__)

SECRET_FILE = "DISTTRAIN_JOB_SECRET_FILE"  # path of a 0600 file holding the job secret (sbatch templates)
PORT_OVERRIDE = "DISTTRAIN_MASTER_PORT"  # pin the store port when the derived one collides
ADDR_OVERRIDE = "DISTTRAIN_MASTER_ADDR"  # the first node's address, when its name does not resolve
PORT_BASE, PORT_SPAN = 12000, 16000  # derived ports stay below Linux's ephemeral range (32768+)


class SlurmEnvError(LauncherError):
    """SLURM's variables are missing, malformed or contradict each other (or the config)."""


def parse_signal(name: str) -> signal.Signals:
    """``"USR1"``, ``"SIGUSR1"`` or ``"10"`` -> the signal; SlurmEnvError naming slurm.signal otherwise."""
    raw = str(name).strip().upper()
    try:
        if raw.isdigit():
            return signal.Signals(int(raw))
        return signal.Signals[raw if raw.startswith("SIG") else "SIG" + raw]
    except (KeyError, ValueError):
        raise SlurmEnvError(f"slurm.signal: got {name!r}, expected a signal name such as USR1, USR2 or TERM") from None


# -- signals before the trainer is ready -------------------------------------------------
EARLY_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
_early: dict = {"signum": None, "old": {}}


def _early_handler(signum, frame) -> None:
    if _early["signum"] is None:
        _early["signum"] = signum


def catch_signals_early(env: Mapping[str, str] | None = None) -> bool:
    """First thing in a worker, inside a SLURM job only: remember a warning signal that comes
    while torch still imports (its default action would kill set-up). Main thread only.
    The preemption callback later takes it (:func:`take_early_signal`), or
    :func:`release_early_signals` restores the defaults and re-delivers it."""
    if not in_slurm(env) or _early["old"]:
        return False
    try:
        _early["old"] = {s: signal.signal(s, _early_handler) for s in EARLY_SIGNALS}
    except ValueError:  # not the main thread
        return False
    return True


def take_early_signal() -> int | None:
    """The signal caught before the real handlers were installed (None if none); forgets it."""
    signum, _early["signum"] = _early["signum"], None
    _early["old"] = {}
    return signum


def release_early_signals() -> None:
    """No preemption handling after all: restore the handlers and re-deliver a caught signal."""
    for s, h in _early["old"].items():
        signal.signal(s, h)
    signum = take_early_signal()
    if signum is not None:
        os.kill(os.getpid(), signum)


# -- hostlists ---------------------------------------------------------------------------
_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside brackets."""
    out, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _expand_range(body: str, whole: str) -> list[str]:
    values = []
    for part in body.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise SlurmEnvError(
                f"node list {whole!r}: cannot read range {part!r} in [{body}]. HINT: ranges look "
                "like node[1-4,7] or gpu[001-016]"
            )
        if not dash:
            values.append(lo)
            continue
        a, b = int(lo), int(hi)
        if b < a:
            raise SlurmEnvError(f"node list {whole!r}: range {part!r} runs backwards")
        if b - a > 100_000:
            raise SlurmEnvError(f"node list {whole!r}: range {part!r} is implausibly long")
        width = len(lo)  # SLURM pads every value to the lower bound's width: [08-10] -> 08 09 10
        values.extend(str(i).zfill(width) for i in range(a, b + 1))
    return values


def expand_hostlist(nodelist: str) -> list[str]:
    """``"gpu[01-03,07],cpu-a[1-2]b[1-2],login"`` -> the node names in SLURM's order.

    Supports several groups, ranges with zero padding, lists inside brackets and several
    bracket groups in one name (expanded like SLURM: the first bracket varies slowest).
    Raises :class:`SlurmEnvError` naming the list on anything it cannot read.
    """
    if not nodelist or not nodelist.strip():
        raise SlurmEnvError("node list is empty. HINT: run inside a SLURM allocation (srun/sbatch/salloc)")
    if nodelist.count("[") != nodelist.count("]"):
        raise SlurmEnvError(f"node list {nodelist!r}: unbalanced brackets")
    hosts: list[str] = []
    for item in _split_top(nodelist.strip()):
        item = item.strip()
        if not item:
            raise SlurmEnvError(f"node list {nodelist!r}: empty entry between commas")
        depth = 0
        for ch in item:
            depth += (ch == "[") - (ch == "]")
            if depth not in (0, 1):
                raise SlurmEnvError(f"node list {nodelist!r}: nested or stray brackets in {item!r}")
        names = [""]
        pos = 0
        for m in _BRACKET.finditer(item):
            prefix = item[pos : m.start()]
            if "[" in prefix or "]" in prefix:
                raise SlurmEnvError(f"node list {nodelist!r}: stray bracket in {item!r}")
            values = _expand_range(m.group(1), nodelist)
            names = [n + prefix + v for n in names for v in values]
            pos = m.end()
        rest = item[pos:]
        if "[" in rest or "]" in rest:
            raise SlurmEnvError(f"node list {nodelist!r}: stray bracket in {item!r}")
        hosts.extend(n + rest for n in names)
    return hosts


def scontrol_hostnames(nodelist: str, timeout: float = 10.0) -> list[str] | None:
    """``scontrol show hostnames`` (None when scontrol is not installed or fails)."""
    if shutil.which("scontrol") is None:
        return None
    try:
        proc = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.split() if proc.returncode == 0 else None


def expand_tasks_per_node(spec: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` (``"2(x3),1"``) -> ``[2, 2, 2, 1]``."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise SlurmEnvError(f"SLURM_TASKS_PER_NODE={spec!r}: cannot read {part!r}; expected e.g. 2(x3),1")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


# -- the job, as SLURM describes it --------------------------------------------------------
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
    else:
        local_world = world // nnodes if world % nnodes == 0 else 1
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


# -- addresses, ports, secrets ------------------------------------------------------------
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


def _read_secret_file(path: str) -> str:
    try:
        with open(path) as f:
            secret = f.read().strip()
    except OSError as exc:
        raise SlurmEnvError(f"{SECRET_FILE}={path}: cannot read the job secret ({exc.strerror})") from None
    if not secret:
        raise SlurmEnvError(f"{SECRET_FILE}={path}: the file is empty")
    return secret


def job_secret(
    place: SlurmPlace,
    secret_dir: str | None,
    creator: bool,
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
) -> tuple[str, str | None]:
    """(secret, file we created or None). ``creator`` writes the fallback file; others wait for it."""
    env = os.environ if env is None else env
    if env.get(E.SECRET):
        return env[E.SECRET], None
    if env.get(SECRET_FILE):
        return _read_secret_file(env[SECRET_FILE]), None
    if not secret_dir:
        raise SlurmEnvError(
            f"{place.where}: no job secret. HINT: export {E.SECRET} or {SECRET_FILE} (a 0600 file) "
            "in the batch script; `disttrain submit` does this"
        )
    # Named by job, step and restart: a file left by another job or attempt is never read.
    path = os.path.join(secret_dir, f".slurm-secret-{place.job_id}.{place.step_id}.{place.restart_count}")
    if creator:
        os.makedirs(secret_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        os.replace(tmp, path)
        return _read_secret_file(path), path
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SlurmEnvError(
                f"{place.where}: waited {timeout:g}s for rank 0's job secret {path}. HINT: "
                f"{secret_dir} must be on a filesystem all nodes share, or export {SECRET_FILE}"
            )
        time.sleep(0.05)
    return _read_secret_file(path), None


def contract_env(place: SlurmPlace, master_addr: str, store_port: int, secret: str) -> dict[str, str]:
    """Our variables for one srun-started worker (torchrun's names plus ours). The job id carries the
    restart count: a requeued attempt never meets shared-memory names a killed one left behind."""
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
        E.JOB_ID: f"slurm-{place.job_id}.{place.step_id}.r{place.restart_count}",
        E.HOST: place.nodes[place.node_rank],
        E.NODE_RANK: str(place.node_rank),
        E.NNODES: str(place.nnodes),
        E.STORE: f"{master_addr}:{store_port}",
        E.SECRET: secret,
    }


class SlurmWorker:
    """What ``setup_worker`` set up; rank 0 holds the store until ``close()`` (or process exit)."""

    def __init__(self, place: SlurmPlace, server=None, secret_path: str | None = None):
        self.place, self.server, self.secret_path = place, server, secret_path

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.secret_path:
            try:
                os.remove(self.secret_path)
            except OSError:
                pass
            self.secret_path = None


def setup_worker(
    secret_dir: str | None = None,
    *,
    nodes: int | None = None,
    ntasks_per_node: int | None = None,
    env: dict | None = None,
    timeout: float = 120.0,
) -> SlurmWorker | None:
    """Called by every worker before it connects. Does nothing (returns None) unless srun started
    it directly: someone else (our agent, torchrun) already set ``RANK`` and ``WORLD_SIZE``.

    Exports the contract into ``env`` (default ``os.environ``); rank 0 opens the job's store,
    the others only need it to be there when they connect (their clients retry).
    """
    env = os.environ if env is None else env
    if not env.get("SLURM_PROCID") or (E.RANK in env and E.WORLD_SIZE in env):
        return None
    place = read_slurm_env(env)
    check_against_config(place, nodes, ntasks_per_node)
    if place.rank == 0 and env.get("SLURMD_NODENAME") and env["SLURMD_NODENAME"] != place.first_node:
        raise SlurmEnvError(
            f"{place.where}: rank 0 runs on {env['SLURMD_NODENAME']}, not on the first node "
            f"{place.first_node}, where the others look for the store. HINT: srun "
            "--distribution=block (the default), or export DISTTRAIN_MASTER_ADDR"
        )
    addr = env.get(ADDR_OVERRIDE) or node_address(place.first_node)
    port = int(env[PORT_OVERRIDE]) if env.get(PORT_OVERRIDE) else derive_port(place.job_id, place.step_id)
    secret, secret_path = job_secret(place, secret_dir, place.rank == 0, timeout, env)
    server = None
    if place.rank == 0:
        from .store import StoreError, StoreServer

        try:
            server = StoreServer(secret, "0.0.0.0", port, advertise=addr).start()
        except StoreError as exc:
            raise SlurmEnvError(
                f"{place.where}: {exc} (port {port} is derived from the job id). HINT: export "
                f"{PORT_OVERRIDE}=<a free port> in the batch script"
            ) from None
    env.update(contract_env(place, addr, port, secret))
    log.info("%s: srun-started worker; store %s:%d", place.where, addr, port)
    return SlurmWorker(place, server, secret_path)


# -- requeue ------------------------------------------------------------------------------
def requeue_id(env: Mapping[str, str] | None = None) -> str:
    """What to requeue: ``ARRAYJOB_TASK`` for an array task (never the whole array), else the job id."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    job = env.get("SLURM_JOB_ID")
    if not job:
        raise SlurmEnvError("cannot requeue: SLURM_JOB_ID is not set (not inside a SLURM job)")
    return job


_CONTRACT_PREFIXES = ("DISTTRAIN_", "TORCHELASTIC_", "SLURM_")
_CONTRACT_NAMES = {
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
}


def _clean_env() -> dict[str, str]:
    """This worker's environment without its place in the old job (sbatch exports the environment:
    a resubmitted job must not inherit the old rank, store address or secret). SLURM_CONF stays."""
    return {
        k: v
        for k, v in os.environ.items()
        if k == "SLURM_CONF" or not (k in _CONTRACT_NAMES or k.startswith(_CONTRACT_PREFIXES))
    }


def _requeued(job: str, timeout: float) -> bool:
    """Whether SLURM shows ``job`` requeued (pending again, or a restart counted since we started)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=timeout
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    state = re.search(r"\bJobState=(\S+)", out)
    restarts = re.search(r"\bRestarts=(\d+)", out)
    before = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    return bool(
        (state and state.group(1) in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"))
        or (restarts and int(restarts.group(1)) > before)
    )


def requeue(job: str, array_task_id: str | None = None, script: str | None = None, timeout: float = 60.0) -> str:
    """Put ``job`` (a job id, or ``ARRAYJOB_TASK``) back in the queue; returns what was done.

    Called by rank 0 once every rank has saved. ``scontrol requeue`` first; when scontrol is
    missing or refuses, resubmit ``script`` with sbatch (only the array task, for arrays).
    Raises :class:`SlurmEnvError` when neither works.
    """
    tried = []
    if shutil.which("scontrol"):
        try:
            proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=timeout)
            if proc.returncode == 0:
                return f"requeued job {job} (scontrol requeue)"
            # The requeue cancels this very job step, so scontrol (a child of a worker in it) can be
            # killed before it answers although the requeue took effect: ask SLURM before resubmitting,
            # or the job would run twice.
            if _requeued(job, timeout):
                return f"requeued job {job} (scontrol requeue; confirmed by scontrol show job)"
            tried.append(f"scontrol requeue {job}: {(proc.stderr or proc.stdout).strip() or f'exit {proc.returncode}'}")
        except subprocess.TimeoutExpired:
            tried.append(f"scontrol requeue {job}: no answer in {timeout:g}s")
    else:
        tried.append("scontrol: not installed")
    if script and shutil.which("sbatch"):
        cmd = ["sbatch", "--parsable"] + ([f"--array={array_task_id}"] if array_task_id else []) + [script]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_clean_env())
            if proc.returncode == 0:
                return f"resubmitted {script} as job {proc.stdout.strip()} (sbatch)"
            tried.append(f"sbatch {script}: {(proc.stderr or proc.stdout).strip()}")
        except subprocess.TimeoutExpired:
            tried.append(f"sbatch {script}: no answer in {timeout:g}s")
    elif not script:
        tried.append("no batch script to resubmit (DISTTRAIN_SLURM_SCRIPT unset)")
    else:
        tried.append("sbatch: not installed")
    raise SlurmEnvError(
        f"could not requeue job {job}: " + "; ".join(tried) + ". HINT: the checkpoint is saved; "
        "resubmit the job by hand (it resumes), and submit with --requeue"
    )

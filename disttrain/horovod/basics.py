"""init/shutdown, where-am-I queries, process-set registration, and the ``*_built()`` answers.

Why module-level state: Horovod's API is module functions (``hvd.rank()``), so one context per
process is the contract we are replacing; it lives in :data:`_ctx` and nowhere else.

Where am I: torchrun's variables (``RANK``...), else the ones a Horovod launcher sets
(``HOROVOD_RANK``, ``HOROVOD_SIZE``, ``HOROVOD_LOCAL_RANK``...); when both are set they must
agree, so ``hvd.rank()`` is always ``HOROVOD_RANK``. Backend: ``DISTTRAIN_HVD_BACKEND`` names a
``collectives`` backend; by default ``shm`` when every rank is on this host, else ``torch``
(gloo). ``DISTTRAIN_HVD_TIMEOUT`` (seconds, default 300) bounds every transfer and is the
default stall shutdown time, so a missing rank or name raises instead of hanging.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os

import xxhash

import collectives
from collectives import registry

from . import handles, rendezvous, timeline
from .engine import Engine
from .exceptions import HorovodError, HorovodInternalError, NotInitializedError, ProcessSetError
from .process_sets import ProcessSet, global_process_set
from .reduce_op import Adasum, Average, Max, Min, Product, ReduceOp, Sum
from .settings import Settings

__all__ = ["Adasum", "Average", "Max", "Min", "Product", "ReduceOp", "Sum"]  # re-exported
log = logging.getLogger(__name__)

_HOROVOD_VARS = {
    "RANK": "HOROVOD_RANK",
    "WORLD_SIZE": "HOROVOD_SIZE",
    "LOCAL_RANK": "HOROVOD_LOCAL_RANK",
    "LOCAL_WORLD_SIZE": "HOROVOD_LOCAL_SIZE",
}


@dataclasses.dataclass
class _Context:
    engine: Engine
    comm: collectives.Communicator
    backend: str
    owns_comm: bool
    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int
    homogeneous: bool
    sets: dict[int, ProcessSet]


_ctx: _Context | None = None


def context(op: str = "this call") -> _Context:
    if _ctx is None:
        raise NotInitializedError(f"Horovod has not been initialized; use hvd.init() before {op}")
    return _ctx


def default_backend(env: collectives.DistEnv) -> str:
    chosen = os.environ.get("DISTTRAIN_HVD_BACKEND")
    if chosen:
        return chosen
    if env.local_world_size == env.world_size and "shm" in registry.known():
        try:
            if registry.get("shm").is_available():
                return "shm"
        except collectives.BackendUnavailableError:
            pass
    return "torch"


def read_env(environ=None) -> collectives.DistEnv:
    """This process's place, from torchrun's variables or a Horovod launcher's (which must agree)."""
    environ = dict(os.environ if environ is None else environ)
    for ours, theirs in _HOROVOD_VARS.items():
        if theirs not in environ:
            continue
        if ours in environ and environ[ours] != environ[theirs]:
            raise HorovodError(
                f"{ours}={environ[ours]} but {theirs}={environ[theirs]}: the launcher's variables disagree\n"
                "HINT: start the job with one launcher (`disttrain launch` sets both consistently)"
            )
        environ[ours] = environ[theirs]
    if "HOROVOD_HOSTNAME" in environ and "DISTTRAIN_HOST" not in environ:
        environ["DISTTRAIN_HOST"] = environ["HOROVOD_HOSTNAME"]
    return collectives.read_env(environ)


def _store(timeout: float):
    """The launcher's authenticated store (a torch Store) when the launcher runs one."""
    if not os.environ.get("DISTTRAIN_STORE"):
        return None
    from launcher import AuthStore

    return AuthStore.from_env(timeout)


def init(comm=None, process_sets=None) -> None:
    """All ranks, once, collectively: join the job and start the background engine. ``comm``
    may be an existing :class:`collectives.Communicator` (used as is); ``process_sets`` a list
    of :class:`ProcessSet` to register now. Calling it again while initialized does nothing."""
    global _ctx
    if _ctx is not None:
        return
    timeout = float(os.environ.get("DISTTRAIN_HVD_TIMEOUT", "300"))
    if comm is None and rendezvous.enabled():  # elastic: the driver's newest world (disttrain.horovod.elastic)
        data, backend, env = rendezvous.join(timeout)
        owns = True
    elif comm is None:
        env = read_env()
        backend = default_backend(env)
        try:
            data = collectives.init(backend, store=_store(timeout), env=env, check=False, timeout=timeout)
        except collectives.CollectivesError as exc:
            raise HorovodInternalError(
                f"rank {env.where}: hvd.init() could not start backend {backend!r}: {exc}\n"
                f"HINT: set DISTTRAIN_HVD_BACKEND to one of {', '.join(registry.known())}"
            ) from exc
        owns = True
    elif isinstance(comm, collectives.Communicator):
        data, backend, owns, env = comm, comm.backend.name, False, comm.env
    else:
        raise HorovodError(
            f"hvd.init(comm=...) takes a collectives.Communicator, got {type(comm).__name__}\n"
            "HINT: MPI communicators and rank lists are not supported; start the job with "
            "`disttrain launch -np N script.py` and use process sets for subsets of ranks"
        )
    topo = _topology(data, env)
    global_process_set.ranks = list(range(data.world_size))
    global_process_set._registered(0, data.rank)
    engine = Engine(data, data.rank, Settings.from_env(timeout))
    _ctx = _Context(engine, data, backend, owns, data.rank, data.world_size, *topo, sets={0: global_process_set})
    atexit.register(shutdown)
    log.debug("rank %s: disttrain.horovod initialised over %s", env.where, backend)
    for ps in process_sets or []:
        if not isinstance(ps, ProcessSet):
            raise HorovodError("hvd.init(process_sets=...) takes a list of ProcessSet; 'dynamic' is the default here")
        add_process_set(ps)
    if os.environ.get("HOROVOD_TIMELINE", "DYNAMIC") != "DYNAMIC":  # DYNAMIC: hvd.start_timeline() later
        start_timeline(os.environ["HOROVOD_TIMELINE"], mark_cycles=bool(os.environ.get("HOROVOD_TIMELINE_MARK_CYCLES")))


def _topology(comm: collectives.Communicator, env: collectives.DistEnv) -> tuple[int, int, int, int, bool]:
    """local/cross ranks as Horovod defines them: local = same host; cross = same local rank."""
    import torch

    host = xxhash.xxh64_intdigest(env.host.encode()) & 0x7FFF_FFFF_FFFF_FFFF
    mine = torch.tensor([env.local_rank, env.local_world_size, host], dtype=torch.int64)
    rows = [mine.clone() for _ in range(comm.world_size)]
    if comm.world_size > 1:
        comm.allgather(rows, mine)
    table = [r.tolist() for r in rows]
    peers = [r for r, row in enumerate(table) if row[0] == env.local_rank]
    homogeneous = len({row[1] for row in table}) == 1
    return env.local_rank, env.local_world_size, peers.index(comm.rank), len(peers), homogeneous


def shutdown() -> None:
    """Any rank: stop this rank's engine (the other ranks' engines stop with it, as in Horovod:
    their pending ops fail), write the timeline, and close the communicators we opened."""
    global _ctx
    if _ctx is None:
        return
    ctx, _ctx = _ctx, None
    try:
        ctx.engine.shutdown()
    finally:
        timeline.stop_timeline()
        handles.forget_all()
        for sid, ps in ctx.sets.items():
            if sid != 0:
                ps._invalidate()
        if ctx.owns_comm:
            try:
                ctx.comm.close()
            except collectives.CollectivesError:
                pass


def is_initialized() -> bool:
    return _ctx is not None


def size() -> int:
    return context("size()").size


def rank() -> int:
    return context("rank()").rank


def local_size() -> int:
    return context("local_size()").local_size


def local_rank() -> int:
    return context("local_rank()").local_rank


def cross_size() -> int:
    return context("cross_size()").cross_size


def cross_rank() -> int:
    return context("cross_rank()").cross_rank


def is_homogeneous() -> bool:
    return context("is_homogeneous()").homogeneous


def add_process_set(process_set) -> ProcessSet:
    """All ranks, same order, same ranks: register a process set (a ProcessSet or a rank list)
    and return it. A set with the same ranks as a registered one raises ValueError on every rank."""
    ctx = context("add_process_set()")
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    bad = [r for r in ps.ranks if not 0 <= r < ctx.size]
    if bad or not ps.ranks:
        raise ProcessSetError(f"ProcessSet ranks {ps.ranks} must be a non-empty subset of range({ctx.size})")
    sid = ctx.engine.add_set(ps.ranks).result()
    ps._registered(sid, ctx.rank)
    ctx.sets[sid] = ps
    return ps


def remove_process_set(process_set: ProcessSet) -> bool:
    """All ranks: unregister a set (never the global one). True when it was registered; its
    ranks may be registered again afterwards."""
    ctx = context("remove_process_set()")
    sid = process_set.process_set_id
    if sid is None or sid == 0:
        return False
    removed = bool(ctx.engine.remove_set(sid).result())
    if removed:
        ctx.sets.pop(sid, None)
        process_set._invalidate()
    return removed


def process_set_worker(process_set: ProcessSet, op: str):
    """The engine's worker for a set this rank belongs to (ops call this)."""
    ctx = context(op)
    if not isinstance(process_set, ProcessSet):
        raise HorovodError(f"process_set must be a hvd.ProcessSet, got {type(process_set).__name__}")
    w = ctx.engine.worker(process_set.process_set_id)
    if not w.member:
        raise ProcessSetError(
            f"rank {ctx.rank}: {op} on {process_set}, which does not include this rank\n"
            "HINT: guard the call with `if process_set.included():`"
        )
    return w


# -- what is built / enabled: answers for this implementation, not for an installed Horovod --------
def mpi_built() -> bool:
    return "mpi" in registry.known()


def mpi_enabled() -> bool:
    return _ctx is not None and _ctx.backend == "mpi"


def mpi_threads_supported() -> bool:
    return mpi_enabled()


def gloo_built() -> bool:
    return True  # torch's gloo is always there


def gloo_enabled() -> bool:
    return _ctx is not None and _ctx.backend == "torch"


def nccl_built() -> int:
    """Horovod returns the NCCL version (an int, 0 when absent)."""
    try:
        import torch

        return (
            int(torch.cuda.nccl.version()[0] * 1000 + torch.cuda.nccl.version()[1] * 100)
            if torch.cuda.is_available()
            else 0
        )
    except Exception:
        return 0


def ddl_built() -> bool:
    return False


def ccl_built() -> bool:
    return False


def cuda_built() -> bool:
    import torch

    return torch.version.cuda is not None


def rocm_built() -> bool:
    import torch

    return getattr(torch.version, "hip", None) is not None


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """All ranks: record a Chrome trace of every op (rank 0 writes ``file_path``)."""
    timeline.start_timeline(file_path, context("start_timeline()").rank, mark_cycles)


def stop_timeline() -> None:
    timeline.stop_timeline()

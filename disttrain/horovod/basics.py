"""init/shutdown, where-am-I queries, the reduce ops, and the ``*_built()``/``*_enabled()`` answers.

Why module-level state: Horovod's API is module functions (``hvd.rank()``), so one context per
process is the contract we are replacing; it lives in :data:`_ctx` and nowhere else.

Backend: ``DISTTRAIN_HVD_BACKEND`` names a ``collectives`` backend; by default ``shm`` when every
rank is on this host (and ``/dev/shm`` is usable), else ``torch`` (gloo). ``DISTTRAIN_HVD_TIMEOUT``
(seconds, default 300) bounds every op, so a missing rank raises instead of hanging.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os

import xxhash

import collectives
from collectives import registry

from .exceptions import HorovodError, HorovodInternalError, NotInitializedError
from .negotiation import Channel
from .process_sets import ProcessSet, global_process_set, register

log = logging.getLogger(__name__)


class ReduceOp(enum.IntEnum):
    """Horovod's reduce ops, with Horovod's numeric values."""

    Average = 0
    Sum = 1
    Adasum = 2
    Min = 3
    Max = 4
    Product = 5


Average, Sum, Adasum, Min, Max, Product = (
    ReduceOp.Average,
    ReduceOp.Sum,
    ReduceOp.Adasum,
    ReduceOp.Min,
    ReduceOp.Max,
    ReduceOp.Product,
)


@dataclasses.dataclass
class _Context:
    world: Channel
    backend: str
    owns_comm: bool
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int
    homogeneous: bool
    sets: dict[int, ProcessSet]
    next_set_id: int = 1


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


def _store(timeout: float):
    """The launcher's authenticated store (a torch Store) when the launcher runs one."""
    if not os.environ.get("DISTTRAIN_STORE"):
        return None
    from launcher.torch_store import AuthStore

    return AuthStore.from_env(timeout)


def init(comm=None, process_sets=None) -> None:
    """All ranks, once, collectively: join the job. ``comm`` may be an existing
    :class:`collectives.Communicator` (used as is); ``process_sets`` a list of :class:`ProcessSet`
    to register now. Calling it again while initialized does nothing, as in Horovod."""
    global _ctx
    if _ctx is not None:
        return
    timeout = float(os.environ.get("DISTTRAIN_HVD_TIMEOUT", "300"))
    if comm is None:
        env = collectives.read_env()
        backend = default_backend(env)
        try:
            data = collectives.init(backend, store=_store(timeout), env=env, check=False, timeout=timeout)
        except collectives.CollectivesError as exc:
            raise HorovodInternalError(
                f"rank {env.where}: hvd.init() could not start backend {backend!r}: {exc}\n"
                "HINT: set DISTTRAIN_HVD_BACKEND to one of "
                f"{', '.join(registry.known())}"
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
    size = data.world_size
    world = Channel(data, data.new_group(range(size)), 0, range(size))
    topo = _topology(world, env)
    global_process_set.ranks = list(range(size))
    global_process_set.process_set_id = 0
    global_process_set._channel = world
    global_process_set._my_rank = data.rank
    _ctx = _Context(world, backend, owns, *topo, sets={0: global_process_set})
    log.debug("rank %s: disttrain.horovod initialised over %s", env.where, backend)
    for ps in process_sets or []:
        if not isinstance(ps, ProcessSet):
            raise HorovodError("hvd.init(process_sets=...) takes a list of ProcessSet; 'dynamic' is the default here")
        add_process_set(ps)
    if os.environ.get("HOROVOD_TIMELINE"):
        from .timeline import start_timeline

        start_timeline(os.environ["HOROVOD_TIMELINE"], mark_cycles=bool(os.environ.get("HOROVOD_TIMELINE_MARK_CYCLES")))


def _topology(world: Channel, env: collectives.DistEnv) -> tuple[int, int, int, int, bool]:
    """local/cross ranks as Horovod defines them: local = same host; cross = same local rank."""
    import torch

    host = xxhash.xxh64_intdigest(env.host.encode()) & 0x7FFF_FFFF_FFFF_FFFF
    mine = torch.tensor([env.local_rank, env.local_world_size, host], dtype=torch.int64)
    rows = [mine.clone() for _ in range(world.size)]
    if world.size > 1:
        world.ctl.allgather(rows, mine)
    table = [r.tolist() for r in rows]
    peers = [r for r, row in enumerate(table) if row[0] == env.local_rank]
    homogeneous = len({row[1] for row in table}) == 1
    return env.local_rank, env.local_world_size, peers.index(world.rank), len(peers), homogeneous


def shutdown() -> None:
    """All ranks: stop the timeline, drop process sets and close the communicators we opened."""
    global _ctx
    if _ctx is None:
        return
    from . import ops, timeline

    timeline.stop_timeline()
    ops.forget_handles()
    ctx, _ctx = _ctx, None
    for sid, ps in list(ctx.sets.items()):
        if sid != 0 and ps._channel is not None:
            ps._channel.close()
        ps.process_set_id, ps._channel = None, None
    ctx.world.ctl.close()
    if ctx.owns_comm:
        ctx.world.data.close()


def is_initialized() -> bool:
    return _ctx is not None


def size() -> int:
    return context("size()").world.size


def rank() -> int:
    return context("rank()").world.rank


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
    """All ranks, same order, same ranks: register a process set (a ProcessSet or a rank list)."""
    ctx = context("add_process_set()")
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    for other in ctx.sets.values():
        if other.ranks == ps.ranks and other is not ps:
            raise HorovodError(
                f"a process set with ranks {ps.ranks} is already registered as id {other.process_set_id}"
            )
    register(ps, ctx.next_set_id, ctx.world, ctx.world.rank)
    ctx.sets[ps.process_set_id] = ps
    ctx.next_set_id += 1
    return ps


def remove_process_set(process_set: ProcessSet) -> bool:
    """All ranks: unregister a set (not the global one). Returns True when it was registered."""
    ctx = context("remove_process_set()")
    sid = process_set.process_set_id
    if sid in (None, 0) or ctx.sets.get(sid) is not process_set:
        return False
    ctx.world.negotiate(ctx.world.fingerprint("remove_process_set", [], "none", f"id={sid}"))
    if process_set._channel is not None:
        process_set._channel.close()
    del ctx.sets[sid]
    process_set.process_set_id, process_set._channel = None, None
    return True


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
    from . import timeline

    timeline.start_timeline(file_path, mark_cycles)


def stop_timeline() -> None:
    from . import timeline

    timeline.stop_timeline()

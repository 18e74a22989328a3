"""``horovod``: an installed Horovod (``horovod.torch``, gloo controller) as a transport.

For users who have Horovod built (see scripts/build_horovod.sh) and want its ops under our
communicator. Bootstrapped without ``horovodrun``: rank 0 starts Horovod's own rendezvous
HTTP server in-process (the one ``horovodrun --gloo`` starts; bound and guarded by
:mod:`.horovod_rendezvous`), publishes its address through
the job's authenticated store (required beyond one rank), and every rank then sets
the ``HOROVOD_*`` variables horovodrun would set and calls ``hvd.init()``.

Mapping: allreduce, broadcast and barrier are Horovod's; allgather and all_to_all flatten to
1-D and use Horovod's ragged allgather/alltoall; reduce_scatter (arbitrary per-rank sizes) is
an allreduce of the flat concatenation, keeping our slice. Subgroups are Horovod process sets
(needs dynamic process sets, which we switch on). Horovod has no point-to-point ops, so
``send``/``recv`` raise. Horovod ops have no timeout; ``wait`` polls them against ours.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from typing import ClassVar

import torch

from ..backend import Backend
from ..env import DistEnv
from ..errors import BackendUnavailableError, CollectivesError, CollectiveTimeoutError
from ..types import ReduceOp, Work
from . import horovod_rendezvous as rendezvous
from .loopback import one_host, pin_one_host_job

_hvd = None


def _horovod():
    global _hvd
    if _hvd is None:
        import horovod.torch as hvd

        _hvd = hvd
    return _hvd


class _HvdWork:
    """A Horovod handle; ``then`` runs once after completion (copy-out, slicing)."""

    def __init__(self, handles: list, then=None):
        self._handles, self._then, self._done = handles, then, False

    def wait(self, timeout: float | None = None) -> None:
        if self._done:
            return
        hvd = _horovod()
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 1e-5
        for h in self._handles:
            while not hvd.poll(h):
                if deadline is not None and time.monotonic() > deadline:
                    raise CollectiveTimeoutError(f"horovod op did not complete within {timeout:g}s")
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)
        try:
            outs = [hvd.synchronize(h) for h in self._handles]
        except Exception as exc:  # HorovodInternalError and friends
            raise CollectivesError(f"horovod failed: {exc}") from exc
        if self._then is not None:
            self._then(outs)
        self._done = True

    def is_completed(self) -> bool:
        return self._done or all(_horovod().poll(h) for h in self._handles)


class HorovodBackend(Backend):
    name: ClassVar[str] = "horovod"

    def __init__(
        self, rank: int, world_size: int, process_set=None, global_ranks: Sequence[int] | None = None, store=None
    ):
        self.rank, self.world_size, self.store = rank, world_size, store
        self._ps = process_set
        self._global = list(global_ranks) if global_ranks is not None else list(range(world_size))

    @classmethod
    def is_available(cls) -> bool:
        try:
            _horovod()
        except Exception:
            return False
        return True

    @classmethod
    def create(cls, env: DistEnv, store=None, timeout: float = 300.0, device: str = "cpu") -> HorovodBackend:
        if not device.startswith("cpu"):
            raise BackendUnavailableError(f"rank {env.where}: the horovod backend here runs CPU tensors (gloo) only")
        hvd = _horovod()
        if store is None:
            store = _default_store(env, timeout)
        host = env.host
        store.set(f"collectives/horovod/host/{env.rank}", host.encode())
        if env.rank == 0:
            hosts = []
            for r in range(env.world_size):
                store.wait([f"collectives/horovod/host/{r}"])
                hosts.append(store.get(f"collectives/horovod/host/{r}").decode())
            addr, port = _start_rendezvous(env, hosts)
            store.set("collectives/horovod/rendezvous", f"{addr}:{port}".encode())
        store.wait(["collectives/horovod/rendezvous"])
        addr, _, port = store.get("collectives/horovod/rendezvous").decode().rpartition(":")
        all_local = env.local_world_size == env.world_size
        os.environ.update(
            {
                "HOROVOD_GLOO_RENDEZVOUS_ADDR": addr,
                "HOROVOD_GLOO_RENDEZVOUS_PORT": port,
                "HOROVOD_CONTROLLER": "gloo",
                "HOROVOD_CPU_OPERATIONS": "gloo",
                "HOROVOD_HOSTNAME": host,
                "HOROVOD_RANK": str(env.rank),
                "HOROVOD_SIZE": str(env.world_size),
                "HOROVOD_LOCAL_RANK": str(env.local_rank),
                "HOROVOD_LOCAL_SIZE": str(env.local_world_size),
                "HOROVOD_CROSS_RANK": str(env.rank // max(1, env.local_world_size)),
                "HOROVOD_CROSS_SIZE": str(max(1, env.world_size // max(1, env.local_world_size))),
                "HOROVOD_DYNAMIC_PROCESS_SETS": "1",
                "HOROVOD_GLOO_TIMEOUT_SECONDS": str(int(timeout)),
            }
        )
        iface = os.environ.get("GLOO_SOCKET_IFNAME") or ("lo" if all_local else None)
        if iface:
            os.environ["HOROVOD_GLOO_IFACE"] = iface
        pin_one_host_job(env)
        hvd.init()
        if hvd.rank() != env.rank or hvd.size() != env.world_size:
            raise CollectivesError(
                f"rank {env.where}: horovod came up as rank {hvd.rank()} of {hvd.size()}, "
                f"expected {env.rank} of {env.world_size}"
            )
        return cls(env.rank, env.world_size, store=store)

    # -- helpers --------------------------------------------------------------------------
    def _kw(self) -> dict:
        return {"process_set": self._ps} if self._ps is not None else {}

    @staticmethod
    def _op(op: ReduceOp):
        hvd = _horovod()
        return {
            ReduceOp.SUM: hvd.Sum,
            ReduceOp.AVG: hvd.Average,
            ReduceOp.MIN: hvd.Min,
            ReduceOp.MAX: hvd.Max,
            ReduceOp.PROD: hvd.Product,
        }[op]

    # -- ops ------------------------------------------------------------------------------
    def allreduce(self, tensor: torch.Tensor, op: ReduceOp) -> Work:
        hvd = _horovod()
        if op is ReduceOp.AVG and not tensor.is_floating_point():
            raise CollectivesError("horovod backend: integer AVG is not supported")
        return _HvdWork([hvd.allreduce_async_(tensor, op=self._op(op), **self._kw())])

    def broadcast(self, tensor: torch.Tensor, src: int) -> Work:
        return _HvdWork([_horovod().broadcast_async_(tensor, self._global[src], **self._kw())])

    def allgather(self, outputs: Sequence[torch.Tensor], tensor: torch.Tensor) -> Work:
        h = _horovod().allgather_async(tensor.reshape(-1), **self._kw())

        def scatter(outs):
            for o, piece in zip(outputs, outs[0].split([o.numel() for o in outputs])):
                o.copy_(piece.view_as(o))

        return _HvdWork([h], scatter)

    def reduce_scatter(self, output: torch.Tensor, inputs: Sequence[torch.Tensor], op: ReduceOp) -> Work:
        flat = torch.cat([t.reshape(-1) for t in inputs])
        work = self.allreduce(flat, op)
        start = sum(t.numel() for t in inputs[: self.rank])
        return _HvdWork(work._handles, lambda _: output.copy_(flat[start : start + output.numel()].view_as(output)))

    def all_to_all(self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> Work:
        flat = torch.cat([t.reshape(-1) for t in inputs])
        splits = torch.tensor([t.numel() for t in inputs], dtype=torch.int32)
        h = _horovod().alltoall_async(flat, splits=splits, **self._kw())

        def scatter(outs):
            out, _received = outs[0]
            for o, piece in zip(outputs, out.split([o.numel() for o in outputs])):
                o.copy_(piece.view_as(o))

        return _HvdWork([h], scatter)

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> Work:
        raise CollectivesError(
            "the horovod backend has no point-to-point ops (Horovod has none)\n"
            "HINT: use backend 'torch', 'mpi' or 'shm' for send/recv"
        )

    def recv(self, tensor: torch.Tensor, src: int, tag: int) -> Work:
        return self.send(tensor, src, tag)

    def barrier(self) -> Work:
        _horovod().barrier(**self._kw())
        return _HvdWork([])

    def new_group(self, ranks: Sequence[int]) -> HorovodBackend | None:
        """Every rank calls it (Horovod registers process sets collectively)."""
        hvd = _horovod()
        global_ranks = [self._global[r] for r in sorted(ranks)]
        ps = _SETS.get(tuple(global_ranks))
        if ps is None:
            ps = hvd.global_process_set if len(global_ranks) == hvd.size() else hvd.add_process_set(global_ranks)
            _SETS[tuple(global_ranks)] = ps
        if self.rank not in ranks:
            return None
        return HorovodBackend(sorted(ranks).index(self.rank), len(ranks), ps, global_ranks, self.store)

    def close(self) -> None:
        if self._ps is None and _hvd is not None and _hvd.is_initialized():
            _SETS.clear()
            _hvd.shutdown()
            srv = _SERVER.pop("server", None)
            if srv is not None:
                rendezvous.stop(srv)


_SETS: dict[tuple[int, ...], object] = {}
_SERVER: dict[str, object] = {}


def _start_rendezvous(env: DistEnv, hosts: list[str]) -> tuple[str, int]:
    """Rank 0: Horovod's rendezvous server with the slot plan for our ranks (ranks on a host
    must be consecutive, as our launcher places them)."""
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts

    order: list[str] = []
    for h in hosts:
        if h not in order:
            order.append(h)
    plan = get_host_assignments(parse_hosts(",".join(f"{h}:{hosts.count(h)}" for h in order)), len(hosts))
    if [s.hostname for s in plan] != hosts:
        raise CollectivesError(
            f"rank {env.where}: horovod needs the ranks of a host to be consecutive; ranks sit on {hosts}"
        )
    # Loopback for a one-host job (and only our own user gets in); else the address the ranks are
    # told, never every interface (horovod's own start() binds 0.0.0.0).
    addr = "127.0.0.1" if one_host(env) else (env.master_addr or socket.gethostname())
    try:
        bind = socket.gethostbyname(addr)
    except OSError as exc:
        raise CollectivesError(f"rank {env.where}: cannot resolve {addr} for horovod's rendezvous ({exc})") from None
    if not one_host(env) and rendezvous.is_loopback(bind):
        raise CollectivesError(
            f"rank {env.where}: {addr} resolves to {bind}, which the other hosts cannot reach\nHINT: set "
            "MASTER_ADDR to an address of this host on the network the ranks share"
        )
    server, port = rendezvous.start(bind, plan)
    _SERVER["server"] = server
    return addr, port


def _default_store(env: DistEnv, timeout: float):
    """Only a one-rank job needs no store. An unauthenticated c10d TCPStore on MASTER_PORT would
    let anyone who reaches the port steer the rendezvous (issue 14), so we refuse to open one."""
    import torch.distributed as dist

    if env.world_size == 1:
        return dist.HashStore()
    raise CollectivesError(
        f"rank {env.where}: the horovod backend needs the job's authenticated store to publish Horovod's "
        "rendezvous address; it will not open an unauthenticated TCPStore at MASTER_ADDR:MASTER_PORT\n"
        "HINT: start workers with `disttrain launch` (which runs the store) and pass "
        "store=launcher.torch_store.AuthStore.from_env(timeout) to collectives.init"
    )

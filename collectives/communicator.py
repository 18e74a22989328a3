"""The public communicator: one API over every backend.

All ranks of a group call the same ops in the same order. Each op works in place on
torch tensors, takes an optional ``timeout`` (seconds) and, with ``async_op=True``,
returns a :class:`Work` whose ``wait()`` completes it; otherwise it blocks and returns
None. Argument checks (dtype, layout) happen here, once, for every backend.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from . import registry
from .backend import Backend
from .env import DistEnv, read_env
from .errors import InvalidTensorError
from .types import SUPPORTED_DTYPES, CompletedWork, ReduceOp, Work

log = logging.getLogger(__name__)


class _CopyBackWork:
    """Completes ``work`` then copies contiguous scratch results back into the caller's tensors."""

    def __init__(self, work: Work, pairs: list[tuple[torch.Tensor, torch.Tensor]], timeout: float):
        self._work, self._pairs, self._timeout, self._done = work, pairs, timeout, False

    def wait(self, timeout: float | None = None) -> None:
        if self._done:
            return
        self._work.wait(self._timeout if timeout is None else timeout)
        for dst, src in self._pairs:
            dst.copy_(src)
        self._done = True

    def is_completed(self) -> bool:
        return self._done or self._work.is_completed()


class Communicator:
    """A group of ranks and the backend that moves their tensors. Build with :func:`init`."""

    def __init__(self, backend: Backend, env: DistEnv, *, check: bool = True, timeout: float = 300.0):
        self.backend, self.env, self.check, self.timeout = backend, env, check, timeout

    @property
    def rank(self) -> int:
        return self.backend.rank

    @property
    def world_size(self) -> int:
        return self.backend.world_size

    def __repr__(self) -> str:
        return f"Communicator({self.backend.name}, rank={self.rank}/{self.world_size} on {self.env.host})"

    # -- argument handling -------------------------------------------------------------
    def _prep(self, op: str, tensors: Sequence[torch.Tensor], pairs: list) -> list[torch.Tensor]:
        out = []
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise InvalidTensorError(f"rank {self.env.where}: {op} expects torch tensors, got {type(t).__name__}")
            if t.dtype not in SUPPORTED_DTYPES:
                raise InvalidTensorError(
                    f"rank {self.env.where}: {op} does not support dtype {t.dtype}; "
                    f"supported: {', '.join(str(d) for d in SUPPORTED_DTYPES)}"
                )
            if not t.is_contiguous():
                scratch = t.contiguous()
                pairs.append((t, scratch))
                t = scratch
            out.append(t)
        return out

    def _finish(self, work: Work, pairs: list, async_op: bool, timeout: float | None) -> Work | None:
        timeout = self.timeout if timeout is None else timeout
        handle: Work = _CopyBackWork(work, pairs, timeout) if pairs else work
        if async_op:
            return handle
        handle.wait(timeout)
        return None

    # -- ops -----------------------------------------------------------------------------
    def allreduce(self, tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM, *, async_op: bool = False,
                  timeout: float | None = None) -> Work | None:
        pairs: list = []
        (t,) = self._prep("allreduce", [tensor], pairs)
        return self._finish(self.backend.allreduce(t, ReduceOp(op)), pairs, async_op, timeout)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, *, async_op: bool = False,
                  timeout: float | None = None) -> Work | None:
        pairs: list = []
        (t,) = self._prep("broadcast", [tensor], pairs)
        return self._finish(self.backend.broadcast(t, src), pairs, async_op, timeout)

    def allgather(self, outputs: Sequence[torch.Tensor], tensor: torch.Tensor, *, async_op: bool = False,
                  timeout: float | None = None) -> Work | None:
        pairs: list = []
        (t,) = self._prep("allgather", [tensor], pairs)
        outs = self._prep("allgather", outputs, pairs)
        return self._finish(self.backend.allgather(outs, t), pairs, async_op, timeout)

    def reduce_scatter(self, output: torch.Tensor, inputs: Sequence[torch.Tensor], op: ReduceOp = ReduceOp.SUM, *,
                       async_op: bool = False, timeout: float | None = None) -> Work | None:
        pairs: list = []
        (o,) = self._prep("reduce_scatter", [output], pairs)
        ins = self._prep("reduce_scatter", inputs, [])
        return self._finish(self.backend.reduce_scatter(o, ins, ReduceOp(op)), pairs, async_op, timeout)

    def all_to_all(self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], *, async_op: bool = False,
                   timeout: float | None = None) -> Work | None:
        pairs: list = []
        outs = self._prep("all_to_all", outputs, pairs)
        ins = self._prep("all_to_all", inputs, [])
        return self._finish(self.backend.all_to_all(outs, ins), pairs, async_op, timeout)

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0, *, async_op: bool = False,
             timeout: float | None = None) -> Work | None:
        (t,) = self._prep("send", [tensor], [])
        return self._finish(self.backend.send(t, dst, tag), [], async_op, timeout)

    def recv(self, tensor: torch.Tensor, src: int, tag: int = 0, *, async_op: bool = False,
             timeout: float | None = None) -> Work | None:
        pairs: list = []
        (t,) = self._prep("recv", [tensor], pairs)
        return self._finish(self.backend.recv(t, src, tag), pairs, async_op, timeout)

    def barrier(self, *, async_op: bool = False, timeout: float | None = None) -> Work | None:
        return self._finish(self.backend.barrier(), [], async_op, timeout)

    # -- groups --------------------------------------------------------------------------
    def new_group(self, ranks: Sequence[int]) -> "Communicator | None":
        """All ranks of this group call it with the same ``ranks``; non-members get None."""
        sub = self.backend.new_group(sorted(ranks))
        return None if sub is None else Communicator(sub, self.env, check=self.check, timeout=self.timeout)

    def split(self, color: int, key: int | None = None) -> "Communicator | None":
        """MPI_Comm_split: ranks with the same ``color`` form a group, ordered by ``key`` then rank."""
        mine = torch.tensor([color, self.rank if key is None else key, self.rank], dtype=torch.int64)
        table = [torch.empty(3, dtype=torch.int64) for _ in range(self.world_size)]
        self.allgather(table, mine)
        rows = sorted((int(t[0]), int(t[1]), int(t[2])) for t in table)
        result = None
        for c in sorted({r[0] for r in rows}):
            members = [r[2] for r in rows if r[0] == c]
            sub = self.new_group(members)
            if c == color:
                result = sub
        return result

    def alloc(self, shape: Sequence[int] | int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor in the backend's preferred memory (a shared segment for ``shm``) for zero-copy ops."""
        alloc = getattr(self.backend, "alloc", None)
        return alloc(shape, dtype) if alloc else torch.empty(shape, dtype=dtype)

    def close(self) -> None:
        self.backend.close()


def init(backend: str = "torch", *, store=None, env: DistEnv | None = None, check: bool = True,
         timeout: float = 300.0, device: str = "cpu") -> Communicator:
    """Create the world communicator. Every rank calls it once, collectively; blocks until all join.

    ``store`` is a ``torch.distributed.Store`` the ranks share (the launcher's authenticated
    store); without one, backends bootstrap from the environment (MASTER_ADDR/MASTER_PORT, MPI).
    """
    env = env or read_env()
    cls = registry.get(backend)
    if not cls.is_available():
        from .errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"backend {backend!r} is not available on {env.host}; available here: {', '.join(registry.available())}"
        )
    impl = cls.create(env, store, timeout, device=device)
    comm = Communicator(impl, env, check=check, timeout=timeout)
    log.debug("rank %s: initialised %r", env.where, comm)
    return comm

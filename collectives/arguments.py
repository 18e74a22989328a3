"""Argument checks of communicator ops, once per call signature: tensor types, dtypes, layouts,
one tensor per rank, ranks and tags. Errors name the rank and host and say what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import checks
from .env import DistEnv
from .errors import InvalidTensorError
from .types import SUPPORTED_DTYPES


class ArgumentChecks:
    """The checks a :class:`~collectives.communicator.Communicator` runs on its arguments."""

    env: DistEnv
    group: str
    rank: int
    world_size: int

    def _prep(self, op: str, tensors: Sequence[torch.Tensor], after: list | None) -> list[torch.Tensor]:
        """Validate; replace non-contiguous tensors by contiguous scratch (copied back when
        ``after`` is given, i.e. for outputs)."""
        out = []
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise InvalidTensorError(f"rank {self.env.where}: {op} expects torch tensors, got {type(t).__name__}")
            if t.dtype not in SUPPORTED_DTYPES:
                raise InvalidTensorError(
                    f"rank {self.env.where}: {op} does not support dtype {t.dtype}; "
                    f"supported: {', '.join(str(d) for d in SUPPORTED_DTYPES)}"
                )
            if t.is_sparse or t.layout != torch.strided:
                raise InvalidTensorError(
                    f"rank {self.env.where}: {op} needs dense tensors, got layout {t.layout}"
                    "\nHINT: call .to_dense() first"
                )
            if not t.is_contiguous():
                scratch = t.contiguous()
                if after is not None:
                    after.append(lambda dst=t, src=scratch: dst.copy_(src))
                t = scratch
            out.append(t)
        return out

    def _same_dtype(self, op: str, tensors: Sequence[torch.Tensor]) -> torch.dtype:
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1:
            raise InvalidTensorError(f"rank {self.env.where}: {op} needs one dtype, got {sorted(map(str, dtypes))}")
        return next(iter(dtypes))

    def _list(self, op: str, what: str, tensors: Sequence[torch.Tensor]) -> None:
        if len(tensors) != self.world_size:
            raise InvalidTensorError(
                f"rank {self.env.where}: {op} needs one {what} tensor per rank ({self.world_size}), got {len(tensors)}"
            )

    def _rank_arg(self, op: str, name: str, r: int) -> None:
        if not isinstance(r, int) or not 0 <= r < self.world_size:
            raise InvalidTensorError(
                f"rank {self.env.where}: {op} {name}={r!r} is not a rank of group "
                f"{self.group!r} (size {self.world_size})"
            )

    def _p2p_args(self, op: str, peer: int, tag: int) -> None:
        self._rank_arg(op, "peer", peer)
        if peer == self.rank:
            raise InvalidTensorError(f"rank {self.env.where}: {op} to/from itself would deadlock")
        if not isinstance(tag, int) or not 0 <= tag < checks.CHECK_TAG:
            raise InvalidTensorError(f"rank {self.env.where}: {op} tag={tag!r} must be in [0, {checks.CHECK_TAG})")

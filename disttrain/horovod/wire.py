"""How a tensor op is described on the wire: dtype codes, 63-bit digests, fusion keys.

Every rank turns each op it submits into four int64 (see ``negotiation``): a digest of its
*name* (what ranks match on), a digest of its *signature* (op kind, dtype, shape, reduce op,
scale factors, root: what must agree for the op to run), a *fusion key* (op kind, dtype and
reduce op packed so that a rank which joined can rebuild the zeros it contributes, plus a
digest of the scale factors) and one op-specific integer (element count, first dimension).
"""

from __future__ import annotations

import enum

import torch
import xxhash

from collectives.types import SUPPORTED_DTYPES

from .exceptions import HorovodError

MASK63 = 0x7FFF_FFFF_FFFF_FFFF
# Narrow integers travel as int32: values round-trip exactly; sums wrap as the narrow type would.
WIDEN = {torch.uint8: torch.int32, torch.int8: torch.int32, torch.int16: torch.int32}
DTYPES: tuple[torch.dtype, ...] = (*SUPPORTED_DTYPES, *WIDEN)
_CODE = {dt: i + 1 for i, dt in enumerate(DTYPES)}


class Kind(enum.IntEnum):
    """Op kinds, as Horovod's request types (the names appear in error messages)."""

    ALLREDUCE = 1
    ALLGATHER = 2
    BROADCAST = 3
    ALLTOALL = 4
    REDUCESCATTER = 5
    ADASUM = 6
    BARRIER = 7
    PROCESS_SET = 8  # add or remove a process set (global set only)


JOINABLE = (Kind.ALLREDUCE, Kind.ADASUM, Kind.BARRIER)  # ops a joined rank answers (Horovod 0.28)


def digest(text: str) -> int:
    return xxhash.xxh64_intdigest(text.encode()) & MASK63


def dtype_code(dtype: torch.dtype) -> int:
    return _CODE[dtype]


def code_dtype(code: int) -> torch.dtype:
    return DTYPES[code - 1]


SHARED = 1 << 38  # fuse key flag: the operand is a persistent buffer from ``comm.alloc``, reduced where it lies


def fuse_key(kind: Kind, dtype: torch.dtype, reduce_op: int, scales: tuple[float, float], shared: bool = False) -> int:
    """kind (8 bits) | wire dtype code (8) | reduce op (8) | shared (1) | digest of the scale factors (38)."""
    extra = (digest(repr(scales)) >> 25) | (SHARED if shared else 0)
    return (int(kind) << 55) | (_CODE.get(dtype, 0) << 47) | ((int(reduce_op) & 0xFF) << 39) | extra


def split_key(key: int) -> tuple[Kind, torch.dtype | None, int]:
    kind = Kind((key >> 55) & 0xFF)
    code = (key >> 47) & 0xFF
    return kind, (code_dtype(code) if code else None), (key >> 39) & 0xFF


def wire_dtype(dtype: torch.dtype) -> torch.dtype:
    return WIDEN.get(dtype, dtype)


def to_wire(t, what: str) -> torch.Tensor:
    """``t`` as a contiguous tensor of a dtype every backend moves (narrow ints widened)."""
    if not isinstance(t, torch.Tensor):
        raise HorovodError(f"{what} expects a torch.Tensor, got {type(t).__name__}")
    t = t.detach()  # the engine writes results in place: autograd must not see those writes
    if t.is_sparse:
        raise HorovodError(
            f"{what} got a sparse tensor\nHINT: use hvd.sparse_allreduce_async, or "
            "DistributedOptimizer(sparse_as_dense=True), or .to_dense()"
        )
    if t.dtype in WIDEN:
        return t.to(WIDEN[t.dtype])
    if t.dtype not in SUPPORTED_DTYPES:
        raise HorovodError(f"{what}: dtype {t.dtype} is not supported; supported: {', '.join(map(str, DTYPES))}")
    return t.contiguous()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def scale_(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t *= factor`` for any dtype (integers: computed in float64, truncated, as Horovod casts)."""
    if factor == 1.0:
        return t
    if t.is_floating_point():
        return t.mul_(factor)
    return t.copy_(t.to(torch.float64).mul_(factor).trunc())

"""Reduction kernels of the ``shm`` backend: combine tensors that already sit in memory.

Who calls: ``algorithms`` after a synchronisation step has made peers' data visible.
Nothing here waits or touches the control rows. Rules every kernel follows:
bfloat16/float16 sums, averages and products accumulate in float32 and round once;
integer AVG truncates toward zero (like C integer division).

The latency paths of small allreduces and reduce_scatters run in numpy (``NUMPY_DTYPES``/``NUMPY_UFUNCS``,
on views that ``algorithms`` builds once): its per-call overhead is about a third of torch's at 4 KiB.
"""

from __future__ import annotations

import numpy as np
import torch

from ...types import ReduceOp

LOW_PRECISION = (torch.bfloat16, torch.float16)
NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.int32: np.int32,
    torch.int64: np.int64,
}
NUMPY_UFUNCS = {
    ReduceOp.SUM: np.add,
    ReduceOp.AVG: np.add,
    ReduceOp.MIN: np.minimum,
    ReduceOp.MAX: np.maximum,
    ReduceOp.PROD: np.multiply,
}
_TORCH_FUNCS = {
    ReduceOp.SUM: torch.add,
    ReduceOp.AVG: torch.add,
    ReduceOp.MIN: torch.minimum,
    ReduceOp.MAX: torch.maximum,
    ReduceOp.PROD: torch.mul,
}
# dtype codes written into mailbox records (index = code); order is part of the segment format
WIRE_DTYPES = [
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.float16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.bool,
]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of contiguous ``t``."""
    return t.reshape(-1).view(torch.uint8)


def combine(srcs: list[torch.Tensor], out: torch.Tensor, op: ReduceOp, world: int) -> None:
    """out = reduce(srcs); ``out`` may be ``srcs[0]`` itself (never a later one)."""
    if out.dtype in LOW_PRECISION and op in (ReduceOp.SUM, ReduceOp.AVG, ReduceOp.PROD) and len(srcs) > 1:
        acc = srcs[0].float()
        for s in srcs[1:]:
            acc.mul_(s) if op is ReduceOp.PROD else acc.add_(s)
        if op is ReduceOp.AVG:
            divide(acc, world)
        out.copy_(acc)
        return
    fn = _TORCH_FUNCS[op]
    if len(srcs) == 1:
        if out is not srcs[0]:
            out.copy_(srcs[0])
    else:
        fn(srcs[0], srcs[1], out=out)
        for s in srcs[2:]:
            fn(out, s, out=out)
    if op is ReduceOp.AVG:
        divide(out, world)


def divide(t: torch.Tensor, world: int) -> None:
    if t.is_floating_point():
        t.mul_(reciprocal(world)) if is_power_of_two(world) else t.div_(world)
    else:
        t.div_(world, rounding_mode="trunc")


def is_power_of_two(world: int) -> bool:
    return world > 0 and world & (world - 1) == 0


def reciprocal(world: int) -> float:
    """``1 / world``, for a power of two: exact, so ``x * reciprocal(world)`` rounds the same real number
    as ``x / world`` and gives the same bits for every float (subnormals, infinities, NaN, -0 included),
    at half the cost of a vector division (0.04 against 0.08 ms on 2 MiB of float32 here)."""
    return 1.0 / world


def reduce_rows(rows: torch.Tensor, out: torch.Tensor, op: ReduceOp, world: int) -> None:
    """out = reduce over dim 0 of ``rows`` ([world, n], not aliasing ``out``)."""
    if op in (ReduceOp.SUM, ReduceOp.AVG):
        if out.dtype in LOW_PRECISION:
            total = torch.sum(rows, 0, dtype=torch.float32)
            if op is ReduceOp.AVG:
                divide(total, world)
            out.copy_(total)
            return
        torch.sum(rows, 0, dtype=out.dtype, out=out)
        if op is ReduceOp.AVG:
            divide(out, world)
    elif op is ReduceOp.MIN:
        torch.amin(rows, 0, out=out)
    elif op is ReduceOp.MAX:
        torch.amax(rows, 0, out=out)
    elif out.dtype in LOW_PRECISION:
        out.copy_(torch.prod(rows, 0, dtype=torch.float32))
    else:
        torch.prod(rows, 0, dtype=out.dtype, out=out)


def numpy_reducer(rows: np.ndarray, op: ReduceOp) -> tuple:
    """What :func:`reduce_numpy` needs to reduce ``rows`` ([world, n] numpy views) with ``op``, built once
    by a latency path's plan: (ufunc, the pair's two rows or None, every row or None, divisor or 0)."""
    world = rows.shape[0]
    pair = world == 2
    avg = world if op is ReduceOp.AVG else 0
    return NUMPY_UFUNCS[op], rows[0] if pair else None, rows[1] if pair else None, None if pair else rows, avg


def reduce_numpy(reducer: tuple, out: np.ndarray) -> None:
    """out = reduce over ranks, as ``reducer`` (:func:`numpy_reducer`) says: the small ops' latency path."""
    fn, first, second, rows, avg = reducer
    if rows is None:
        fn(first, second, out=out)
    else:
        fn.reduce(rows, axis=0, out=out)
    if avg:
        np.multiply(out, reciprocal(avg), out=out) if is_power_of_two(avg) else np.divide(out, avg, out=out)


def split_range(n: int, world: int, unit: int = 16) -> list[tuple[int, int]]:
    """Split [0, n) into ``world`` contiguous parts, boundaries on multiples of ``unit``."""
    step = -(-n // world)
    step = -(-step // unit) * unit
    return [(min(n, r * step), min(n, (r + 1) * step)) for r in range(world)]

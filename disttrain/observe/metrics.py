"""The user's metrics over a log window, reduced across ranks at log time.

Two sources, both on every rank:
- a step function's third return value: sums over its units (correct predictions, say), like
  the loss; reduced as ``sum over ranks and steps / global count`` (the per-unit mean), and so
  are evaluation metrics;
- ``run.log({...})``: values; reduced as the mean over ranks and the window's steps.
Either way a name ending in ``_sum``, ``_max`` or ``_min`` is reduced that way instead (``_sum``:
the global sum per step, averaged over the window), and ``run.log(..., reduce={name: "max"})``
declares it.

Accumulating is local and free; :meth:`MetricWindow.reduce` is collective (every rank, same
point): a check that the names agree (one 2-number allreduce), the names' union through an
allgather when they do not (a rank with no samples this window), then one SUM allreduce and, if
any max/min is present, one MAX allreduce.
"""

from __future__ import annotations

import enum
import math
import zlib

import torch

from collectives import Communicator, ReduceOp

from ..errors import DisttrainError


class Reduction(str, enum.Enum):
    MEAN = "mean"  # over ranks and steps
    SUM = "sum"  # over ranks, averaged over steps
    MAX = "max"
    MIN = "min"
    UNIT = "unit"  # sums over units / the global count (step-function and evaluation metrics)


SUFFIXES = {"_sum": Reduction.SUM, "_max": Reduction.MAX, "_min": Reduction.MIN}


def reduction_of(name: str, default: Reduction, declared: str | None = None) -> Reduction:
    if declared is not None:
        try:
            return Reduction(declared)
        except ValueError:
            raise DisttrainError(
                f"metric {name!r}: reduction {declared!r}, expected one of mean, sum, max, min"
            ) from None
    for suffix, how in SUFFIXES.items():
        if name.endswith(suffix):
            return how
    return default


class MetricWindow:
    """This rank's metrics since the last reduce: name -> [reduction, total or extreme, adds]."""

    def __init__(self) -> None:
        self._acc: dict[str, list] = {}
        self._remote_how: dict[str, Reduction] = {}  # how the names only other ranks have are reduced

    def __bool__(self) -> bool:
        return bool(self._acc)

    def add(self, name: str, value: float, how: Reduction) -> None:
        value = float(value)
        cur = self._acc.get(name)
        if cur is None:
            self._acc[name] = [how, value, 1]
            return
        if cur[0] is not how:
            raise DisttrainError(f"metric {name!r} is reduced as {cur[0].value} and as {how.value} in one window")
        if how is Reduction.MAX:
            cur[1] = max(cur[1], value)
        elif how is Reduction.MIN:
            cur[1] = min(cur[1], value)
        else:
            cur[1] += value
        cur[2] += 1

    def add_units(self, metrics: dict, declared: dict | None = None) -> None:
        """A step function's (or evaluation's) metrics: sums over units unless suffixed."""
        for k, v in metrics.items():
            self.add(k, v, reduction_of(k, Reduction.UNIT, (declared or {}).get(k)))

    def add_values(self, metrics: dict, declared: dict | None = None) -> None:
        """``run.log`` values: the mean over ranks and steps unless suffixed or declared."""
        for k, v in metrics.items():
            self.add(k, v, reduction_of(k, Reduction.MEAN, (declared or {}).get(k)))

    def reduce(self, comm: Communicator, steps: int, count: float, replicas: int = 1) -> dict[str, float]:
        """Collective. ``steps``: optimizer steps in the window; ``count``: the global units in it
        (already reduced); ``replicas``: ranks that report the same units (tp/pp peers)."""
        names = self._agreed_names(comm)
        acc = self._acc
        self._acc = {}
        if not names:
            return {}
        hows = [acc[n][0] if n in acc else self._remote_how[n] for n in names]
        sums = torch.zeros(2 * len(names), dtype=torch.float64)
        ext = torch.full((len(names),), -math.inf, dtype=torch.float64)
        for i, n in enumerate(names):
            if n not in acc:
                continue
            how, v, k = acc[n]
            if how is Reduction.MAX:
                ext[i] = v
            elif how is Reduction.MIN:
                ext[i] = -v
            else:
                sums[2 * i], sums[2 * i + 1] = v, k
        comm.allreduce(sums, ReduceOp.SUM)
        if any(h in (Reduction.MAX, Reduction.MIN) for h in hows):
            comm.allreduce(ext, ReduceOp.MAX)
        out = {}
        for i, (n, how) in enumerate(zip(names, hows)):
            total, adds = float(sums[2 * i]), float(sums[2 * i + 1])
            if how is Reduction.MAX:
                out[n] = float(ext[i])
            elif how is Reduction.MIN:
                out[n] = -float(ext[i])
            elif how is Reduction.MEAN:
                out[n] = total / adds if adds else math.nan
            elif how is Reduction.SUM:
                out[n] = total / max(steps, 1) / replicas
            else:
                out[n] = total / replicas / count if count > 0 else math.nan
        return out

    # -- agreeing on names ---------------------------------------------------------------------
    def _agreed_names(self, comm: Communicator) -> list[str]:
        names = sorted(self._acc)
        sig = "\0".join(f"{n}\1{self._acc[n][0].value}" for n in names).encode()
        h = float(zlib.crc32(sig))
        chk = torch.tensor([h, -h], dtype=torch.float64)
        comm.allreduce(chk, ReduceOp.MAX)
        self._remote_how = {}
        if float(chk[0]) == -float(chk[1]):
            return names
        union: dict[str, str] = {}
        for blob in allgather_bytes(comm, sig):
            for item in blob.decode().split("\0") if blob else []:
                n, _, how = item.partition("\1")
                if union.setdefault(n, how) != how:
                    raise DisttrainError(
                        f"rank {comm.env.where}: metric {n!r} is reduced as {union[n]} on one rank and {how} on another"
                    )
        self._remote_how = {n: Reduction(h) for n, h in union.items()}
        return sorted(union)


def allgather_bytes(comm: Communicator, data: bytes) -> list[bytes]:
    """Every rank's ``data``, in rank order. Collective (two allgathers)."""
    world = comm.world_size
    n = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    comm.allgather(sizes, n)
    lens = [int(s) for s in sizes]
    width = max(1, -(-max(lens) // 4))
    mine = torch.zeros(width, dtype=torch.int32)
    if data:
        mine.view(torch.uint8)[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    outs = [torch.zeros(width, dtype=torch.int32) for _ in range(world)]
    comm.allgather(outs, mine)
    return [bytes(o.view(torch.uint8)[:k].numpy()) for o, k in zip(outs, lens)]

"""Pipeline parallelism: the stages of a model on the ranks of the pp group, and the
runner that feeds them micro-batches by a schedule.

This rank holds ``v`` chunks (virtual stages; 1 unless the schedule is interleaved); chunk
``c`` is global stage ``c * p + rank``. Activations travel as :mod:`.wire`
messages (any nesting, shape and dtype) to the next global stage, gradients of the
tensors that need one travel back. Tags name the receiving chunk, so messages of different
chunks between the same two ranks never cross.

Every stage calls :meth:`Pipeline.run` with the same micro-batches; the loss (sum over
micro-batches) is broadcast from the last stage so every rank reports it. Sends are
asynchronous, receives block (with the communicator's timeout), so a dead peer is an error,
not a hang.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn as nn

from collectives import Communicator

from . import wire
from .schedule import build_schedule

ACT_TAG, GRAD_TAG = 1000, 2000


class Pipeline:
    """Runs this rank's chunks. ``group`` is the pp Communicator (group rank = pp rank)."""

    def __init__(
        self,
        chunks: list[nn.Module],
        group: Communicator | None,
        schedule: str,
        microbatches: int,
        tp_group: Communicator | None = None,
        before_forward: Callable[[], None] | None = None,
    ):
        self.chunks, self.group, self.schedule, self.microbatches = chunks, group, schedule, microbatches
        self.p = group.world_size if group is not None else 1
        self.rank = group.rank if group is not None else 0
        self.v = len(chunks)
        self.tp_group = tp_group
        self.before_forward = before_forward or (lambda: None)
        build_schedule(schedule, self.rank, self.p, max(microbatches, self.p), self.v)  # refuse bad combos now
        self.timing = {"busy_s": 0.0, "total_s": 0.0}  # of the last run(): compute time vs the whole step

    # global stage g = chunk * p + rank
    def _is_first(self, c: int) -> bool:
        return c == 0 and self.rank == 0

    def _is_last(self, c: int) -> bool:
        return c == self.v - 1 and self.rank == self.p - 1

    def _prev(self, c: int) -> tuple[int, int]:
        """(pp rank, chunk) of the stage before chunk ``c`` of this rank."""
        return (self.rank - 1, c) if self.rank > 0 else (self.p - 1, c - 1)

    def _next(self, c: int) -> tuple[int, int]:
        return (self.rank + 1, c) if self.rank < self.p - 1 else (0, c + 1)

    def run(self, micro_batches: list[tuple[object, object]], loss_fn, loss_scale: float = 1.0) -> float:
        """Every pp rank, collectively: forward and backward every (input, target) micro-batch by the
        schedule; gradients accumulate in the chunks' parameters (of ``loss * loss_scale``). Returns the
        summed (unscaled) loss on every rank."""
        start = time.perf_counter()
        busy = 0.0
        m = len(micro_batches)
        acts = build_schedule(self.schedule, self.rank, self.p, m, self.v)
        inputs: dict[tuple[int, int], object] = {}
        outputs: dict[tuple[int, int], object] = {}
        pending: list = []
        loss_total = torch.zeros((), dtype=torch.float64, device=self.group.backend.device or "cpu")
        for kind, i, c in acts:
            x, y = micro_batches[i]
            if kind == "F":
                if self._is_first(c):
                    inp = x
                else:
                    src, _ = self._prev(c)
                    inp = wire.recv(self.group, src, ACT_TAG + c, self.tp_group)
                t0 = time.perf_counter()
                self.before_forward()
                out = self.chunks[c](inp)
                if self._is_last(c):
                    out = loss_fn(out, y)
                    loss_total += float(out.detach())
                busy += time.perf_counter() - t0
                if not self._is_last(c):
                    dst, dc = self._next(c)
                    pending += wire.send(self.group, out, dst, ACT_TAG + dc)
                inputs[(i, c)], outputs[(i, c)] = inp, out
            else:
                inp, out = inputs.pop((i, c)), outputs.pop((i, c))
                t0 = time.perf_counter()
                if self._is_last(c):
                    torch.autograd.backward(out * loss_scale if loss_scale != 1.0 else out)
                else:
                    leaves = wire.grad_leaves(out)
                    dst, dc = self._next(c)
                    busy += time.perf_counter() - t0
                    grads = wire.recv(self.group, dst, GRAD_TAG + dc) if leaves else []
                    t0 = time.perf_counter()
                    if leaves:
                        torch.autograd.backward(leaves, list(grads))
                busy += time.perf_counter() - t0
                if not self._is_first(c):
                    in_leaves = wire.grad_leaves(inp)
                    if in_leaves:
                        src, _ = self._prev(c)
                        grads = tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in in_leaves)
                        pending += wire.send(self.group, grads, src, GRAD_TAG + c)
        for w in pending:
            w.wait()
        self.group.broadcast(loss_total, src=self.p - 1)
        self.timing = {"busy_s": busy, "total_s": time.perf_counter() - start}
        return float(loss_total)

    @torch.no_grad()
    def infer(self, x):
        """Every pp rank, collectively: the full model's output for ``x`` on every rank (detached)."""
        out = None
        for c in range(self.v):
            inp = x
            if not self._is_first(c):
                src, _ = self._prev(c)
                inp = wire.recv(self.group, src, ACT_TAG + c, self.tp_group)
            self.before_forward()
            out = self.chunks[c](inp)
            if not self._is_last(c):
                dst, dc = self._next(c)
                for w in wire.send(self.group, out, dst, ACT_TAG + dc):
                    w.wait()
        return wire.broadcast(self.group, out if self.rank == self.p - 1 else None, self.p - 1, self.tp_group)

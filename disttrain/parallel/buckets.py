"""Gradient buckets: flat buffers that gradients live in, reduced as soon as they fill.

Used by data parallel (allreduce) and ZeRO-1 (allreduce, then each rank steps its chunk).
Buckets are laid out in *reverse registration order* (roughly the order backward produces
gradients), the first one small (``first_bucket_mb``) so communication starts early.
Each bucket is one buffer from ``comm.alloc`` (shared memory under the ``shm`` backend, so
its allreduce is zero-copy) and every ``param.grad`` is a view into it (like DDP's
``gradient_as_bucket_view``): autograd accumulates straight into the bucket, no copies.

A post-accumulate-grad hook counts the gradients of the last micro-batch; a bucket whose
parameters have all reported is launched (``async_op=True``). Buckets launch strictly in
index order, so every rank issues the same collectives in the same order even when a
parameter gets no gradient on some rank; :meth:`GradBuckets.finish` launches whatever is
left (an unused parameter contributes its zeros) and waits for all of it.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from collectives import Communicator, ReduceOp

from ..config.parallel import ParallelConfig

WIRE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def plan_buckets(params: list[nn.Parameter], bucket_mb: float, first_bucket_mb: float) -> list[list[nn.Parameter]]:
    """Split ``params`` (registration order) into buckets of reverse order; a parameter is never split,
    and a bucket holds one dtype and device (its gradients are views of one buffer)."""
    groups: list[list[nn.Parameter]] = []
    cur: list[nn.Parameter] = []
    size = 0
    limit = first_bucket_mb * 2**20
    for p in reversed(params):
        if cur and (p.dtype, p.device) != (cur[0].dtype, cur[0].device):
            groups.append(cur)
            cur, size, limit = [], 0, bucket_mb * 2**20
        cur.append(p)
        size += p.numel() * p.element_size()
        if size >= limit:
            groups.append(cur)
            cur, size, limit = [], 0, bucket_mb * 2**20
    if cur:
        groups.append(cur)
    return groups


def alloc_on(comm: Communicator, numel: int, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    """A flat buffer for ``comm``'s collectives on ``device``: the backend's own memory (zero-copy shared
    segments under ``shm``) when it lives there, else plain memory of that device. A deferred model's
    parameters are still on ``meta``: their buffers go where the backend moves tensors."""
    if device is None or device.type == "meta" or torch.device(comm.backend.device or "cpu").type == device.type:
        return comm.alloc(numel, dtype)
    return torch.empty(numel, dtype=dtype, device=device)


class Bucket:
    """One flat gradient buffer over ``params``; ``offsets[i]`` is where ``params[i]`` starts."""

    def __init__(
        self, index: int, params: list[nn.Parameter], comm: Communicator, wire: torch.dtype | None, pad_to: int = 1
    ):
        self.index, self.params = index, params
        self.offsets, n = [], 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.logical_numel = n
        self.numel = math.ceil(n / pad_to) * pad_to if n else pad_to
        # Gradients have their parameter's dtype (bf16 parameters get bf16 gradients) and device.
        dtype, device = (params[0].dtype, params[0].device) if params else (torch.float32, None)
        self.buf = alloc_on(comm, self.numel, dtype, device)
        self.buf.zero_()
        self.wire = alloc_on(comm, self.numel, wire, device) if wire is not None and wire != dtype else None
        self.views = [self.buf[o : o + p.numel()].view_as(p) for p, o in zip(params, self.offsets)]
        self.ready = 0
        self.work = None

    def attach(self) -> None:
        """Point every ``param.grad`` at its view (after someone set grads to None or replaced them)."""
        for p, v in zip(self.params, self.views):
            if p.grad is None or p.grad.data_ptr() != v.data_ptr():
                if p.grad is not None:
                    v.copy_(p.grad)
                p.grad = v


class GradBuckets:
    """Gradient buffers of ``params`` and their asynchronous reduction. All ranks build it identically."""

    def __init__(
        self,
        params: list[nn.Parameter],
        comm: Communicator,
        cfg: ParallelConfig,
        pad_to: int = 1,
        groups: list[list[nn.Parameter]] | None = None,
    ):
        self.comm = comm
        wire = WIRE_DTYPES[cfg.grad_dtype]
        groups = groups if groups is not None else plan_buckets(params, cfg.bucket_mb, cfg.first_bucket_mb)
        self.buckets = [Bucket(i, g, comm, wire, pad_to) for i, g in enumerate(groups)]
        self._where = {p: b for b in self.buckets for p in b.params}
        self.overlap = cfg.overlap and comm.world_size > 1
        self.sync = True  # false during micro-batches that only accumulate
        self._next = 0  # the next bucket to launch (launch order is index order)
        for b in self.buckets:
            b.attach()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params] if self.overlap else []

    @contextlib.contextmanager
    def accumulate(self, last: bool):
        prev, self.sync = self.sync, last
        try:
            yield
        finally:
            self.sync = prev

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self.sync:
            return
        b = self._where[p]
        b.ready += 1
        if b.ready == len(b.params):
            while self._next < len(self.buckets) and self.buckets[self._next].ready >= len(
                self.buckets[self._next].params
            ):
                self._launch(self.buckets[self._next])

    def _launch(self, b: Bucket) -> None:
        b.attach()  # a grad replaced behind our back (set_to_none, user code) is copied back in
        if self.comm.world_size > 1:
            if b.wire is not None:
                b.wire.copy_(b.buf)
                b.work = self.comm.allreduce(b.wire, ReduceOp.SUM, async_op=True)
            else:
                b.work = self.comm.allreduce(b.buf, ReduceOp.SUM, async_op=True)
        self._next = b.index + 1

    def finish(self) -> None:
        """Launch the buckets that did not fill (unused parameters count as zeros), wait for all. Collective."""
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
                b.work = None
                if b.wire is not None:
                    b.buf.copy_(b.wire)
            b.ready = 0
        self._next = 0

    def zero(self) -> None:
        for b in self.buckets:
            b.buf.zero_()
            b.attach()

    def nbytes(self) -> int:
        return sum(
            b.buf.numel() * b.buf.element_size() + (b.wire.numel() * b.wire.element_size() if b.wire is not None else 0)
            for b in self.buckets
        )


def clip_(grads: list[torch.Tensor], max_norm: float, comm: Communicator | None = None) -> float:
    """Clip ``grads`` (flat buffers or shards) to a global norm; with ``comm``, the squares are
    summed over ranks first (sharded gradients). Same formula as ``torch.nn.utils.clip_grad_norm_``."""
    grads = [g for g in grads if g.numel()]
    # On the gradients' device (a rank without gradient elements: the communicator's).
    device = grads[0].device if grads else (comm.backend.device if comm is not None else None)
    sq = torch.zeros(1, dtype=torch.float64, device=device)
    if grads:  # one fused kernel over all tensors (like torch's clip); fp64 sum so shard order barely matters
        sq += torch.stack(torch._foreach_norm(grads)).double().square().sum()
    if comm is not None and comm.world_size > 1:
        comm.allreduce(sq, ReduceOp.SUM)
    norm = math.sqrt(float(sq))
    if max_norm > 0:
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0 and grads:
            torch._foreach_mul_(grads, coef)
    return norm

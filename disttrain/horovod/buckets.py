"""Gradient buckets for ``DistributedOptimizer``: persistent fusion buffers laid out once.

Why: a per-gradient allreduce costs Python on both threads for every parameter of every step
(a hook that wraps, names, describes and submits an op; the engine announcing, fusing, copying
and completing it). Here the dense gradients are laid out once, at construction, into flat
buffers of about ``HOROVOD_FUSION_THRESHOLD`` bytes at most (``DISTTRAIN_HVD_BUCKET_BYTES``,
default 4 MiB; one dtype per bucket; from the set's ``comm.alloc``, so ``shm`` reduces them in
place across processes), in reverse registration order as data parallel's buckets
(``disttrain/parallel/buckets.py``), which is roughly the order backward produces them. A
parameter's post-accumulate-grad hook only counts (and checks ``backward_passes_per_step``);
the hook that completes a bucket copies its gradients in with one ``torch._foreach_copy_`` and
submits the bucket as one in-place allreduce, so reductions start while backward goes on.
``synchronize()`` launches the buckets whose parameters got no gradient on this rank (they
contribute zeros, as Horovod's per-tensor path does), waits, and makes each ``p.grad`` its view
in the bucket (the result where the allreduce wrote it, as DDP's ``gradient_as_bucket_view``):
no copy back, and a step whose gradients accumulate into those views (``zero_grad(set_to_none=
False)``, ``backward_passes_per_step``) needs no copy in either. The gradients autograd
produced (copied in at launch) are held until ``zero_grad()`` (``drop_spent``), where the
per-tensor path frees them too, so the next backward reuses their memory: dropped mid-step,
glibc gave the heap top back to the system and the next backward faulted it in again (837
page faults a step measured on the benchmark's MLP). With ``zero_grad(set_to_none=False)`` or
``backward_passes_per_step`` autograd accumulates into the views: no copy at all. A reference
to ``p.grad`` kept across a step sees the next step's values, as under DDP's bucket views.

Every rank lays out the same buckets from the same ``named_parameters``; a bucket's op is named
after a digest of its parameters' names, so ranks whose layouts differ never pair different
buckets (they stall and fail with the stall inspector's message instead).
"""

from __future__ import annotations

import os

import torch

from . import handles
from .exceptions import HorovodError
from .ops import synchronize
from .submit import alloc_start, allreduce_start
from .wire import digest

BACKWARD_PASSES_ERROR = (
    "Gradients were computed more than backward_passes_per_step times before call to step(). "
    "Increase backward_passes_per_step to accumulate gradients locally."
)


class Bucket:
    """One flat buffer over ``params`` (one dtype); ``views[i]`` is ``params[i]``'s gradient in it."""

    __slots__ = ("params", "views", "buf", "name", "left", "handle", "delay", "flat", "spent")

    def __init__(self, params: list[torch.nn.Parameter], names: list[str], buf: torch.Tensor):
        self.params = params
        self.buf = buf.zero_()
        self.views, off = [], 0
        for p in params:
            self.views.append(self.buf[off : off + p.numel()].view(p.shape))
            off += p.numel()
        self.name = f"bucket.{len(params)}.{digest(chr(0).join(names)):016x}"
        self.left = 0  # parameters still to report in this step
        self.handle: int | None = None
        self.delay: list[int] = []
        self.spent: list[torch.Tensor] = []  # the gradients the views replaced, until zero_grad()


def plan(params: list[torch.nn.Parameter], limit: int) -> list[list[torch.nn.Parameter]]:
    """Reverse registration order, one dtype per bucket, at most ``limit`` bytes (a parameter is never split)."""
    out: list[list[torch.nn.Parameter]] = []
    cur: list[torch.nn.Parameter] = []
    size = 0
    for p in reversed(params):
        b = p.numel() * p.element_size()
        if cur and (size + b > limit or p.dtype != cur[0].dtype):
            out.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += b
    if cur:
        out.append(cur)
    return out


class GradBuckets:
    """The buckets of one optimizer. Hooks run on autograd's thread; the rest on the user's."""

    def __init__(self, params, names: dict, passes: int, op, pre: float, post: float, process_set):
        limit = int(os.environ.get("DISTTRAIN_HVD_BUCKET_BYTES", 4 << 20))
        limit = min(limit, int(os.environ.get("HOROVOD_FUSION_THRESHOLD", 128 << 20)) or limit)
        self.op, self.pre, self.post, self.process_set = op, pre, post, process_set
        self.passes = passes
        layout = plan(params, limit)
        numels = [sum(p.numel() for p in ps) for ps in layout]
        dtypes = [ps[0].dtype for ps in layout]
        tag = f"buckets.{digest(chr(0).join(names[p] for ps in layout for p in ps)):016x}"
        self.tag = tag
        bufs = alloc_start(numels, dtypes, tag, process_set).result()  # collective over the set
        self.buckets = [Bucket(ps, [names[p] for p in ps], buf) for ps, buf in zip(layout, bufs)]
        self.sparse: set = set()  # parameters seen with a sparse gradient: the optimizer's per-tensor path
        self.hooks = []
        for b in self.buckets:
            b.delay = [passes] * len(b.params)
            b.left = len(b.params)
            for i, p in enumerate(b.params):
                self.hooks.append(p.register_post_accumulate_grad_hook(self._hook(b, i)))

    def rebuild(self) -> None:
        """The same layout in buffers of the set's current communicator, the step in progress
        forgotten. Every member, in the same order as the constructors (collective, blocks): after
        an elastic reset, since the old buffers belong to the old world (its ``comm.alloc``)."""
        numels = [sum(p.numel() for p in b.params) for b in self.buckets]
        bufs = alloc_start(numels, [b.params[0].dtype for b in self.buckets], self.tag, self.process_set).result()
        for b, buf in zip(self.buckets, bufs):
            b.buf, b.views, off = buf.zero_(), [], 0
            for p in b.params:
                b.views.append(buf[off : off + p.numel()].view(p.shape))
                off += p.numel()
        self.reset()

    def reset(self, passes: int | None = None) -> None:
        """Forget the step in progress (``load_state_dict``, ``set_backward_passes_per_step``)."""
        if passes is not None:
            self.passes = passes
        for b in self.buckets:
            b.delay = [self.passes] * len(b.params)
            b.left, b.handle, b.spent = len(b.params), None, []

    def _hook(self, b: Bucket, i: int):
        def hook(p):
            d = b.delay[i]
            if d <= 0:
                raise HorovodError(BACKWARD_PASSES_ERROR)
            b.delay[i] = d - 1
            if d == 1:
                b.left -= 1
                if b.left == 0:
                    self._launch(b)

        return hook

    def _launch(self, b: Bucket) -> None:
        grads, views = [], []
        for p, v in zip(b.params, b.views):
            g = p.grad
            if g is None or g.is_sparse:  # no gradient here (another rank may have one), or the sparse path's
                if g is not None:
                    self.sparse.add(p)
                v.zero_()
            elif g is not v and g.data_ptr() != v.data_ptr():
                grads.append(g)
                views.append(v)
        if views:
            torch._foreach_copy_(views, grads)
        # The step's last bucket leaves the set's thread asleep: finish() waits on it next and runs
        # its cycle itself. Earlier ones wake it, so their reductions may overlap the rest of backward.
        last = all(o.handle is not None for o in self.buckets if o is not b)
        hid, h = allreduce_start(
            [b.buf], [b.buf], b.name, self.op, self.pre, self.post, self.process_set, False, True, wake=not last
        )
        b.handle = handles.register(h, hid)

    def drop_spent(self) -> None:
        """From ``zero_grad()``: free the gradients the views replaced (see the module)."""
        for b in self.buckets:
            b.spent = []

    def pending(self) -> bool:
        return any(b.handle is not None or b.left < len(b.params) for b in self.buckets)

    def finish(self) -> None:
        """Launch what the hooks did not (in bucket order, the same on every rank), wait, write back."""
        for b in self.buckets:
            if b.handle is None:
                self._launch(b)
        for b in self.buckets:
            h, b.handle = b.handle, None
            synchronize(h)
            spent = []
            for p, v in zip(b.params, b.views):
                g = p.grad
                if g is None or (g is not v and not g.is_sparse and g.data_ptr() != v.data_ptr()):
                    if g is not None:
                        spent.append(g)
                    p.grad = v  # the result where the allreduce wrote it: no copy back
            b.spent = spent
            b.delay = [self.passes] * len(b.params)
            b.left = len(b.params)

"""``DistributedOptimizer``: Horovod's gradient-averaging optimizer wrapper.

    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   backward_passes_per_step=2, compression=hvd.Compression.fp16)

As in Horovod, a hook on each parameter's gradient accumulator starts an async allreduce as
soon as that gradient is ready (every ``backward_passes_per_step``-th backward), so the
transfer overlaps the rest of the backward pass; ``step()`` (or ``synchronize()``) waits for
them and writes the reduced gradients back. ``groups`` fuses parameters into one allreduce.

Allreduces are named by parameter (``allreduce.<name>``) and matched by name, so ranks may
produce gradients in different orders, or for different parameters (a rank-dependent loss):
``step()`` submits zeros for the parameters this rank has no gradient for, as Horovod does.
Sparse gradients (``nn.Embedding(sparse=True)``) are allgathered as indices and values
(``sparse_as_dense=False``, Horovod's default) or reduced dense and made sparse again.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref

import torch

from . import rendezvous
from .basics import size
from .buckets import GradBuckets
from .compression import Compression
from .exceptions import HorovodError
from .ops import allreduce_async_, grouped_allreduce_async_, sparse_allreduce_async, synchronize
from .process_sets import global_process_set
from .reduce_op import Adasum, Average

# Elastic mode: every optimizer's buckets, in construction order (the same on every rank).
_elastic_buckets: list[weakref.ref[GradBuckets]] = []


def rebuild_elastic_buckets() -> None:
    """Every rank, after ``hvd.init()`` joined a new world (``hvd.elastic``'s reset): lay the
    live optimizers' buckets out again in the new world's buffers, in construction order. A
    worker that joins builds its optimizers in that order too, so the allocations pair up."""
    _elastic_buckets[:] = [r for r in _elastic_buckets if r() is not None]
    for ref in _elastic_buckets:
        buckets = ref()
        if buckets is not None:
            buckets.rebuild()


class _DistributedOptimizer(torch.optim.Optimizer):
    """Mixed into a dynamic subclass of the user's optimizer class (see DistributedOptimizer)."""

    def __init__(
        self,
        params,
        named_parameters,
        compression,
        backward_passes_per_step=1,
        op=Average,
        gradient_predivide_factor=1.0,
        groups=None,
        sparse_as_dense=False,
        process_set=global_process_set,
    ):
        super(self.__class__, self).__init__(params)
        self._compression = compression
        if named_parameters is not None:
            named_parameters = list(named_parameters)
        else:
            named_parameters = [
                (f"allreduce.noname.{i}.{j}", v)
                for i, group in enumerate(self.param_groups)
                for j, v in enumerate(group["params"])
            ]
        if any(not isinstance(p, tuple) for p in named_parameters):
            raise ValueError(
                "named_parameters should be a sequence of tuples (name, parameter), usually "
                "produced by model.named_parameters()."
            )
        names = [k for k, _ in named_parameters]
        dups = sorted({k for k in names if names.count(k) > 1})
        if dups:
            raise ValueError("Parameter names in named_parameters must be unique. Found duplicates: " + ", ".join(dups))
        all_ids = {id(v) for group in self.param_groups for v in group["params"]}
        unnamed = all_ids - {id(v) for _, v in named_parameters}
        if unnamed:
            raise ValueError(
                "named_parameters was specified, but one or more model parameters were not "
                "named. Python object ids: " + ", ".join(str(i) for i in unnamed)
            )
        self._parameter_names = {v: k for k, v in named_parameters}
        self.backward_passes_per_step = backward_passes_per_step
        self._allreduce_delay = {v: backward_passes_per_step for _, v in named_parameters}
        self.op, self.gradient_predivide_factor = op, gradient_predivide_factor
        self.sparse_as_dense, self.process_set = sparse_as_dense, process_set
        if op == Adasum:
            raise HorovodError(
                "DistributedOptimizer(op=hvd.Adasum) is not supported (Horovod's delta-model "
                "Adasum optimizer)\nHINT: use op=hvd.Average, or hvd.allreduce(op=hvd.Adasum) "
                "on your own tensors"
            )
        if gradient_predivide_factor != 1.0 and op != Average:
            raise ValueError("gradient_predivide_factor not supported with op != Average")
        self._handles: dict = {}
        self._grad_accs = []
        self._requires_update: list = []
        self._synchronized = False
        self._should_synchronize = True
        self._p_to_group: dict = {}
        self._group_counts: dict = {}
        self._groups = self._build_groups(groups)
        self._buckets: GradBuckets | None = None
        # Elastic mode (as Horovod): hooks even at size 1, since the world may grow. Buckets over
        # the global set only (other sets end with their world); each reset rebuilds them in the
        # new world's buffers (rebuild_elastic_buckets).
        elastic = rendezvous.enabled()
        if process_set.included() and (size() > 1 or elastic):
            params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
            if (
                (not elastic or process_set is global_process_set)
                and groups is None
                and compression is Compression.none
                and os.environ.get("DISTTRAIN_HVD_BUCKETS") != "0"
                and params
                and all(p.device.type == "cpu" for p in params)  # device buckets: not verified without a GPU
            ):
                pre, post = self._scales()
                self._buckets = GradBuckets(
                    params, self._parameter_names, backward_passes_per_step, op, pre, post, process_set
                )
                self._requires_update = params
                if elastic:
                    _elastic_buckets.append(weakref.ref(self._buckets))
            else:
                self._register_hooks()

    def _build_groups(self, groups):
        if groups is None:
            return None
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if isinstance(groups, int):
            if groups <= 0:
                raise ValueError("groups should be a positive integer or a list of lists of parameters")
            k = -(-len(params) // groups)
            p_groups = [tuple(params[i : i + k]) for i in range(0, len(params), k)]
        else:
            seen, p_groups = set(), []
            for g in groups:
                for p in g:
                    if not isinstance(p, torch.Tensor):
                        raise ValueError("groups must consist of torch.Tensor.")
                    if id(p) in seen:
                        raise ValueError("A parameter can only appear once in groups.")
                    seen.add(id(p))
                p_groups.append(tuple(g))
            p_groups += [(p,) for p in params if id(p) not in seen]
        for g in p_groups:
            for p in g:
                self._p_to_group[p] = g
            self._group_counts[g] = 0
        return p_groups

    def load_state_dict(self, *args, **kwargs):
        self._handles = {}
        self._synchronized = False
        self._should_synchronize = True
        for p in self._allreduce_delay:
            self._allreduce_delay[p] = self.backward_passes_per_step
        if self._buckets is not None:
            self._buckets.reset()
        super(self.__class__, self).load_state_dict(*args, **kwargs)

    def set_backward_passes_per_step(self, passes: int) -> None:
        self.backward_passes_per_step = passes
        for p in self._allreduce_delay:
            self._allreduce_delay[p] = passes
        if self._buckets is not None:
            self._buckets.reset(passes)

    def _register_hooks(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._requires_update.append(p)
                    grad_acc = p.expand_as(p).grad_fn.next_functions[0][0]
                    grad_acc.register_hook(self._make_hook(p))
                    self._grad_accs.append(grad_acc)

    def _scales(self) -> tuple[float, float]:
        if self.op == Average:
            return 1.0 / self.gradient_predivide_factor, self.gradient_predivide_factor
        return 1.0, 1.0

    def _grad(self, p) -> torch.Tensor:
        if p.grad is None:  # not computed here; another rank may have: contribute zeros
            p.grad = torch.zeros_like(p)
        return p.grad.to_dense() if p.grad.is_sparse else p.grad

    def _allreduce_grad_async(self, p):
        name = self._parameter_names.get(p)
        if p.grad is not None and p.grad.is_sparse and not self.sparse_as_dense:
            return sparse_allreduce_async(p.grad, name=name, op=self.op, process_set=self.process_set), None
        compressed, ctx = self._compression.compress(self._grad(p))
        pre, post = self._scales()
        handle = allreduce_async_(
            compressed,
            name=name,
            op=self.op,
            prescale_factor=pre,
            postscale_factor=post,
            process_set=self.process_set,
        )
        return handle, (compressed, ctx)

    def _grouped_allreduce_grad_async(self, ps):
        pairs = [self._compression.compress(self._grad(p)) for p in ps]
        pre, post = self._scales()
        handle = grouped_allreduce_async_(
            [c for c, _ in pairs],
            name=self._parameter_names.get(ps[0]),
            op=self.op,
            prescale_factor=pre,
            postscale_factor=post,
            process_set=self.process_set,
        )
        return handle, pairs

    def _make_hook(self, p):
        def hook(*ignore):
            if p in self._handles and self._handles[p][0] is not None and self._allreduce_delay[p] <= 0:
                raise HorovodError(
                    "Gradients were computed more than backward_passes_per_step times before "
                    "call to step(). Increase backward_passes_per_step to accumulate gradients "
                    "locally."
                )
            handle, ctx = None, None
            self._allreduce_delay[p] -= 1
            if self._allreduce_delay[p] == 0:
                if self._groups is not None:
                    group = self._p_to_group[p]
                    self._group_counts[group] += 1
                    if self._group_counts[group] == len(group):
                        self._handles[group] = self._grouped_allreduce_grad_async(group)
                        for gp in group:
                            self._handles.pop(gp, None)
                        self._group_counts[group] = 0
                        return
                else:
                    handle, ctx = self._allreduce_grad_async(p)
            self._handles[p] = (handle, ctx)

        return hook

    def synchronize(self) -> None:
        """Wait for every gradient's allreduce (starting those no hook started) and write them back."""
        if not self.process_set.included():
            self._synchronized = True
            return
        if self._buckets is not None:
            self._buckets.finish()
            for p in self._requires_update if self._buckets.sparse else ():  # sparse gradients, beside the buckets
                if p in self._buckets.sparse and p.grad is not None and p.grad.is_sparse:
                    self._handles[p] = self._allreduce_grad_async(p)
        else:
            self._start_missing()
        self._collect()
        self._synchronized = True

    def _start_missing(self) -> None:
        """Per-tensor path: start the allreduces no hook started (zeros for missing gradients)."""
        done = set()
        for key in self._handles:
            done.update(key) if isinstance(key, tuple) else done.add(key)
        # In parameter order (identical on every rank), never in set/hash order.
        for p in self._requires_update:
            if p not in done and size() > 1:
                if self._groups is not None:
                    group = self._p_to_group[p]
                    if all(gp not in done for gp in group) and group not in self._handles:
                        self._handles[group] = self._grouped_allreduce_grad_async(group)
                        done.update(group)
                    continue
                self._handles[p] = self._allreduce_grad_async(p)
        for key, (handle, _ctx) in list(self._handles.items()):
            if handle is None:
                self._handles[key] = self._allreduce_grad_async(key)

    def _collect(self) -> None:
        for key, (handle, ctx) in self._handles.items():
            outputs = None if callable(handle) else synchronize(handle)
            if isinstance(key, tuple):
                for gp, out, (_, gctx) in zip(key, outputs, ctx):
                    self._allreduce_delay[gp] = self.backward_passes_per_step
                    gp.grad.set_(self._compression.decompress(out, gctx))
                self._group_counts[key] = 0
            else:
                self._allreduce_delay[key] = self.backward_passes_per_step
                if callable(handle):  # sparse: the allgathered indices and values
                    key.grad.zero_().add_(handle())
                elif key.grad.is_sparse:  # sparse_as_dense: reduced dense, made sparse again
                    key.grad.zero_().add_(self._compression.decompress(outputs, ctx[1]).to_sparse())
                else:
                    key.grad.set_(self._compression.decompress(outputs, ctx[1]))
        self._handles.clear()

    @contextlib.contextmanager
    def skip_synchronize(self):
        """``optimizer.synchronize()`` then ``with optimizer.skip_synchronize(): optimizer.step()``
        (gradient clipping between the two)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn(
                    "optimizer.step() called without optimizer.skip_synchronize() context after "
                    "optimizer.synchronize(). This can cause training slowdown.",
                    stacklevel=2,
                )
            self.synchronize()
        self._synchronized = False
        return super(self.__class__, self).step(closure)

    def zero_grad(self, *args, **kwargs):
        if self._handles or (self._buckets is not None and self._buckets.pending()):
            raise HorovodError(
                "optimizer.zero_grad() was called after loss.backward() but before "
                "optimizer.step() or optimizer.synchronize(). This is prohibited as it can cause "
                "a race condition."
            )
        if self._buckets is not None:
            self._buckets.drop_spent()
        return super(self.__class__, self).zero_grad(*args, **kwargs)


def DistributedOptimizer(
    optimizer,
    named_parameters=None,
    compression=Compression.none,
    backward_passes_per_step=1,
    op=Average,
    gradient_predivide_factor=1.0,
    num_groups=0,
    groups=None,
    sparse_as_dense=False,
    process_set=global_process_set,
):
    """Wrap ``optimizer`` so that ``step()`` applies gradients reduced over ``process_set``
    (averaged by default). Called on every rank with the same model. Returns an instance of a
    subclass of ``optimizer``'s class sharing its param groups (state starts empty, as in Horovod)."""
    if num_groups != 0:
        warnings.warn(
            "Parameter `num_groups` has been replaced by `groups` and will be removed in v0.23.0.",
            DeprecationWarning,
            stacklevel=2,
        )
        groups = groups or num_groups
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DistributedOptimizer.__dict__))
    return cls(
        optimizer.param_groups,
        named_parameters,
        compression,
        backward_passes_per_step,
        op,
        gradient_predivide_factor,
        groups,
        sparse_as_dense,
        process_set,
    )

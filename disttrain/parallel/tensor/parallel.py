"""Tensor parallelism (Megatron style): layers whose weights are split across the tp group.

A column-parallel linear splits its *output* features (each rank computes a slice of the
activations), a row-parallel linear splits its *input* features (each rank computes a
partial sum, then one allreduce). A column layer followed by a row layer (qkv -> proj,
fc -> proj) needs one allreduce forward and one backward, through the conjugate pair:

* ``f`` (copy_to_tp): identity forward, allreduce of the gradient backward;
* ``g`` (reduce_from_tp): allreduce forward, identity backward.

With sequence parallelism (:attr:`TPContext.sequence_parallel`) the activations between a
row layer and the next column layer are split along the sequence (dim 1, batch first):
``g`` becomes a reduce-scatter over the sequence, ``f`` an allgather, and norms/dropout in
between run on 1/tp of the tokens (their replicated parameters' gradients are partial sums,
added over tp by the strategy).

Layers accept ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2: a linear stored transposed,
``weight[in, out]``); the local weight keeps the source's layout, so checkpoint boxes index
the single-process tensor. Every parallel parameter carries a :class:`TPSlice` saying which
box of the logical tensor it holds. Every rank of the tp group calls these layers in the
same order (they communicate). The plan that places them is in :mod:`.plan`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from collectives import Communicator, ReduceOp

from .rng_tracker import RNGTracker
from .vocab import VocabShard, mark_vocab_shard


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part ``index`` when ``n`` items are split into ``parts`` near-equal parts."""
    return index * n // parts, (index + 1) * n // parts


@dataclasses.dataclass(frozen=True)
class TPSlice:
    """Where a local parameter sits in its logical tensor: ``pieces`` along ``dim`` as
    (local_start, local_stop, global_start, global_stop)."""

    global_shape: tuple[int, ...]
    dim: int
    pieces: tuple[tuple[int, int, int, int], ...]

    def boxes(self) -> list[tuple[tuple[int, int], tuple[tuple[int, int], ...]]]:
        """[(local (start, stop) along dim, global box)] per piece."""
        out = []
        for ls, le, gs, ge in self.pieces:
            box = tuple((gs, ge) if d == self.dim else (0, n) for d, n in enumerate(self.global_shape))
            out.append(((ls, le), box))
        return out

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's local tensor cut out of the full logical one."""
        return torch.cat([full.narrow(self.dim, gs, ge - gs) for _, _, gs, ge in self.pieces], dim=self.dim)


def tp_slice(p: torch.Tensor) -> TPSlice | None:
    """The box of the logical tensor a parameter holds, or None if it is replicated across tp."""
    return getattr(p, "tp_slice", None)


def is_partial_grad(p: torch.Tensor) -> bool:
    """True for a replicated parameter whose gradient each tp rank holds only a part of (sequence parallel)."""
    return getattr(p, "tp_partial_grad", False)


def mark_partial_grad(p: nn.Parameter) -> None:
    p.tp_partial_grad = True


@dataclasses.dataclass
class TPContext:
    """What every parallel layer of one model shares: the tp group and its options."""

    group: Communicator | None
    size: int
    rank: int
    sequence_parallel: bool = False
    rng: RNGTracker | None = None
    seq_dim: int = 1

    def sharded_region(self) -> None:
        if self.rng is not None:
            self.rng.enter_sharded()

    def replicated_region(self) -> None:
        """After a layer whose output is the same on every tp rank (or sequence-split: still per rank)."""
        if self.rng is not None:
            self.rng.enter_sharded() if self.sequence_parallel else self.rng.enter_replicated()


def _pieces(n: int, partitions: int, tp: int, rank: int) -> tuple[tuple[int, int, int, int], ...]:
    """Split each of ``partitions`` equal chunks of ``n`` across tp (q, k, v split consistently)."""
    chunk, out, local = n // partitions, [], 0
    for c in range(partitions):
        s, e = split_range(chunk, tp, rank)
        out.append((local, local + e - s, c * chunk + s, c * chunk + e))
        local += e - s
    return tuple(out)


def _take(p: torch.Tensor, sl: TPSlice, shared: dict) -> nn.Parameter:
    """The local parameter for ``sl`` of ``p``; tied parameters (one object under several names) stay one."""
    key = id(p)
    if key in shared:
        q = shared[key]
        if tp_slice(q) != sl:
            raise ValueError(f"a tied parameter {tuple(p.shape)} is split two different ways by the plan")
        return q
    q = nn.Parameter(sl.take(p.detach()).clone(), requires_grad=p.requires_grad)
    q.tp_slice = sl
    shared[key] = q
    return q


# -- the conjugate collectives ---------------------------------------------------------------
def _allreduce(x: torch.Tensor, group: Communicator) -> torch.Tensor:
    # Reduce in fp32 so bf16 partial sums are rounded once, like the single-process matmul's.
    y = x.float().contiguous().clone()
    group.allreduce(y, ReduceOp.SUM)
    return y.to(x.dtype)


def _gather(x: torch.Tensor, group: Communicator, dim: int) -> torch.Tensor:
    """Equal pieces along ``dim`` from every tp rank, concatenated in rank order."""
    x = x.contiguous()
    outs = [torch.empty_like(x) for _ in range(group.world_size)]
    group.allgather(outs, x)
    return torch.cat(outs, dim=dim)


def _reduce_scatter(x: torch.Tensor, group: Communicator, dim: int) -> torch.Tensor:
    n, tp = x.shape[dim], group.world_size
    if n % tp:
        raise ValueError(
            f"sequence parallel: dim {dim} of size {n} does not split across tp={tp}"
            f"\nHINT: use a sequence length divisible by {tp}, or drop the 'sequence' entries of the plan"
        )
    parts = [c.float().contiguous() for c in x.chunk(tp, dim=dim)]
    out = torch.empty_like(parts[0])
    group.reduce_scatter(out, parts, ReduceOp.SUM)
    return out.to(x.dtype)


class _CopyToTP(torch.autograd.Function):
    """f: identity forward, allreduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _allreduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """g: allreduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _allreduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherSeq(torch.autograd.Function):
    """Sequence-parallel f: allgather along ``dim`` forward, reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ScatterSeq(torch.autograd.Function):
    """Sequence-parallel g: reduce-scatter along ``dim`` forward, allgather backward."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, ctx.dim), None, None


class _GatherLast(torch.autograd.Function):
    """Allgather along the last dim (sizes may differ per rank) forward, own slice backward."""

    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        x = x.contiguous()
        outs = [torch.empty(*x.shape[:-1], s, dtype=x.dtype, device=x.device) for s in sizes]
        group.allgather(outs, x)
        return torch.cat(outs, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        start = sum(ctx.sizes[: ctx.group.rank])
        return grad.narrow(-1, start, ctx.sizes[ctx.group.rank]).contiguous(), None, None


def copy_to_tp(x, group):
    return x if group is None else _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return x if group is None else _ReduceFromTP.apply(x, group)


def _enter(x: torch.Tensor, ctx: TPContext) -> torch.Tensor:
    """Input of a column layer: replicated (f) or sequence-split (allgather)."""
    if ctx.group is None:
        return x
    return _GatherSeq.apply(x, ctx.group, ctx.seq_dim) if ctx.sequence_parallel else _CopyToTP.apply(x, ctx.group)


def _leave(x: torch.Tensor, ctx: TPContext) -> torch.Tensor:
    """Output of a row layer / vocab embedding: summed (g) or summed and sequence-split (reduce-scatter)."""
    if ctx.group is None:
        return x
    return _ScatterSeq.apply(x, ctx.group, ctx.seq_dim) if ctx.sequence_parallel else _ReduceFromTP.apply(x, ctx.group)


def _shape_of(mod: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, transposed) of an nn.Linear or a transformers Conv1D."""
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features, False
    w = mod.weight  # Conv1D: weight[in, out], y = x @ w + b
    return w.shape[0], w.shape[1], True


# -- layers -----------------------------------------------------------------------------------
class ColumnParallelLinear(nn.Module):
    """Output features split across tp; ``partitions`` equal chunks (fused q/k/v, gate/up) are
    split each on its own so every rank holds whole heads of each. ``gather_output`` allgathers
    the full output; without it, a vocabulary head's output is marked as a vocabulary shard
    (see :func:`disttrain.parallel.tensor.vocab.cross_entropy`)."""

    def __init__(
        self,
        source: nn.Module,
        ctx: TPContext,
        partitions: int = 1,
        gather_output: bool = False,
        shared: dict | None = None,
    ):
        super().__init__()
        self.ctx, self.gather_output = ctx, gather_output
        self.in_features, out, self.transposed = _shape_of(source)
        self.global_out_features = out
        self.pieces = pieces = _pieces(out, partitions, ctx.size, ctx.rank)
        self.out_features = sum(p[1] - p[0] for p in pieces)
        self.sizes = [sum(p[1] - p[0] for p in _pieces(out, partitions, ctx.size, r)) for r in range(ctx.size)]
        self.vocab_start = pieces[0][2] if partitions == 1 else 0
        shared = {} if shared is None else shared
        wsl = TPSlice(tuple(source.weight.shape), 1 if self.transposed else 0, pieces)
        self.weight = _take(source.weight, wsl, shared)
        if source.bias is not None:
            self.bias = _take(source.bias, TPSlice((out,), 0, pieces), shared)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _enter(x, self.ctx)
        self.ctx.sharded_region()
        return self.finish(self.local(x))

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's output features for an input that already entered the tp region."""
        return F.linear(x, self.weight.t() if self.transposed else self.weight, self.bias)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """The local output as the layer returns it: gathered, or marked as a vocabulary shard."""
        if self.ctx.group is None:
            return y
        if self.gather_output:
            if self.ctx.rng is not None:
                self.ctx.rng.enter_replicated()
            return _GatherLast.apply(y, self.ctx.group, self.sizes)
        return mark_vocab_shard(y, VocabShard(self.ctx.group, self.vocab_start, self.global_out_features))


class RowParallelLinear(nn.Module):
    """Input features split across tp (the input arrives split, from a column layer);
    partial products are summed by one allreduce; the bias is added once, after it."""

    def __init__(self, source: nn.Module, ctx: TPContext, shared: dict | None = None):
        super().__init__()
        self.ctx = ctx
        n_in, self.out_features, self.transposed = _shape_of(source)
        self.pieces = pieces = _pieces(n_in, 1, ctx.size, ctx.rank)
        self.in_features = pieces[0][1]
        shared = {} if shared is None else shared
        self.weight = _take(
            source.weight, TPSlice(tuple(source.weight.shape), 0 if self.transposed else 1, pieces), shared
        )
        self.bias = None if source.bias is None else source.bias  # replicated: the same Parameter object
        if ctx.sequence_parallel and self.bias is not None:
            mark_partial_grad(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.partial(x))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of the output (no bias) from its input features."""
        return F.linear(x, self.weight.t() if self.transposed else self.weight)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """Partial sums summed over tp (once), then the bias."""
        y = _leave(y, self.ctx)
        self.ctx.replicated_region()
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows (token ids) split across tp: each rank looks up the ids it owns, zeroes the
    rest, and an allreduce (reduce-scatter under sequence parallel) assembles the embedding."""

    def __init__(self, emb: nn.Embedding, ctx: TPContext, shared: dict | None = None):
        super().__init__()
        self.ctx, self.embedding_dim = ctx, emb.embedding_dim
        self.vocab_size, self.padding_idx = emb.num_embeddings, emb.padding_idx
        self.start, self.stop = split_range(self.vocab_size, ctx.size, ctx.rank)
        self.num_embeddings = self.stop - self.start
        sl = TPSlice(tuple(emb.weight.shape), 0, ((0, self.num_embeddings, self.start, self.stop),))
        self.weight = _take(emb.weight, sl, {} if shared is None else shared)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.stop)
        local = (ids - self.start).masked_fill(outside, 0)
        pad = self.padding_idx
        pad = pad - self.start if pad is not None and self.start <= pad < self.stop else None  # no gradient there
        out = F.embedding(local, self.weight, padding_idx=pad).masked_fill(outside.unsqueeze(-1), 0.0)
        out = _leave(out, self.ctx)
        self.ctx.replicated_region()
        return out


def apply_sequence_region(mod: nn.Module, ctx: TPContext) -> None:
    """Mark ``mod`` (a norm, dropout, ...) as running on a sequence shard: its replicated
    parameters' gradients are partial (summed over tp by the strategy) and its dropout draws
    from the per-rank stream."""
    for p in mod.parameters():
        mark_partial_grad(p)
    mod.register_forward_pre_hook(lambda m, args: ctx.sharded_region())

"""Tensor parallelism (Megatron style): layers whose weights are split across the tp group.

A column-parallel linear splits its *output* features (each rank computes a slice of the
activations), a row-parallel linear splits its *input* features (each rank computes a
partial sum, then one allreduce). A column layer followed by a row layer (qkv -> proj,
fc -> proj) needs one allreduce forward and one backward, through the conjugate pair:

* ``f`` (copy_to_tp): identity forward, allreduce of the gradient backward;
* ``g`` (reduce_from_tp): allreduce forward, identity backward.

``apply_tensor_parallel(model, mesh, plan)`` swaps modules named by a plan (glob patterns
over module names -> a style) for their parallel versions, slicing the full weights each
rank built from the same seed; the model's code is untouched. Every parallel parameter
carries a :class:`TPSlice` saying which box of the logical (single-process) tensor it
holds, which checkpoints and the equivalence tests use. Every rank of the tp group calls
these layers in the same order (they communicate).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch

import torch
import torch.nn as nn
import torch.nn.functional as F

from collectives import Communicator, ReduceOp

from ..mesh import DeviceMesh, MeshError


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


def _mark(p: nn.Parameter, sl: TPSlice) -> nn.Parameter:
    p.tp_slice = sl
    return p


def _pieces(n: int, partitions: int, tp: int, rank: int) -> tuple[tuple[int, int, int, int], ...]:
    """Split each of ``partitions`` equal chunks of ``n`` across tp (q, k, v split consistently)."""
    chunk, out, local = n // partitions, [], 0
    for c in range(partitions):
        s, e = split_range(chunk, tp, rank)
        out.append((local, local + e - s, c * chunk + s, c * chunk + e))
        local += e - s
    return tuple(out)


# -- the conjugate collectives ---------------------------------------------------------------
def _allreduce(x: torch.Tensor, group: Communicator) -> torch.Tensor:
    # Reduce in fp32 so bf16 partial sums are rounded once, like the single-process matmul's.
    y = x.float().contiguous().clone()
    group.allreduce(y, ReduceOp.SUM)
    return y.to(x.dtype)


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


class _GatherFromTP(torch.autograd.Function):
    """Allgather along the last dim (sizes may differ per rank) forward, own slice backward."""

    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        x = x.contiguous()
        lead = x.shape[:-1]
        outs = [torch.empty(*lead, s, dtype=x.dtype) for s in sizes]
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


# -- layers -----------------------------------------------------------------------------------
class ColumnParallelLinear(nn.Module):
    """Output features split across tp; ``partitions`` equal chunks (q, k, v) are split
    each on its own so every rank holds whole heads of each. ``gather_output`` allgathers
    the full output (for a head whose logits go into an ordinary loss)."""

    def __init__(
        self,
        linear: nn.Linear,
        group: Communicator | None,
        tp: int,
        rank: int,
        partitions: int = 1,
        gather_output: bool = False,
    ):
        super().__init__()
        self.group, self.gather_output = group, gather_output
        out, self.in_features = linear.out_features, linear.in_features
        pieces = _pieces(out, partitions, tp, rank)
        self.out_features = sum(p[1] - p[0] for p in pieces)
        self.sizes = [sum(p[1] - p[0] for p in _pieces(out, partitions, tp, r)) for r in range(tp)]
        wsl = TPSlice(tuple(linear.weight.shape), 0, pieces)
        self.weight = _mark(nn.Parameter(wsl.take(linear.weight.detach()).clone()), wsl)
        if linear.bias is not None:
            bsl = TPSlice((out,), 0, pieces)
            self.bias = _mark(nn.Parameter(bsl.take(linear.bias.detach()).clone()), bsl)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp(x, self.group), self.weight, self.bias)
        if self.gather_output and self.group is not None:
            y = _GatherFromTP.apply(y, self.group, self.sizes)
        return y


class RowParallelLinear(nn.Module):
    """Input features split across tp (the input arrives split, from a column layer);
    partial products are summed by one allreduce; the bias is added once, after it."""

    def __init__(self, linear: nn.Linear, group: Communicator | None, tp: int, rank: int):
        super().__init__()
        self.group, self.out_features = group, linear.out_features
        pieces = _pieces(linear.in_features, 1, tp, rank)
        self.in_features = pieces[0][1]
        wsl = TPSlice(tuple(linear.weight.shape), 1, pieces)
        self.weight = _mark(nn.Parameter(wsl.take(linear.weight.detach()).clone()), wsl)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())  # replicated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows (token ids) split across tp: each rank looks up the ids it owns, zeroes the
    rest, and an allreduce assembles the embedding."""

    def __init__(self, emb: nn.Embedding, group: Communicator | None, tp: int, rank: int):
        super().__init__()
        self.group, self.embedding_dim = group, emb.embedding_dim
        self.vocab_size = emb.num_embeddings
        self.start, self.stop = split_range(self.vocab_size, tp, rank)
        self.num_embeddings = self.stop - self.start
        sl = TPSlice(tuple(emb.weight.shape), 0, ((0, self.num_embeddings, self.start, self.stop),))
        self.weight = _mark(nn.Parameter(sl.take(emb.weight.detach()).clone()), sl)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.stop)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, start):
        logits = logits.float()
        n = logits.shape[-1]
        m = logits.max(dim=-1).values
        group.allreduce(m, ReduceOp.MAX)
        shifted = logits - m.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        inside = (target >= start) & (target < start + n)
        local_t = (target - start).masked_fill(~inside, 0)
        picked = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0.0)
        both = torch.stack([sum_exp, picked])
        group.allreduce(both, ReduceOp.SUM)
        sum_exp, picked = both[0], both[1]
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local_t, inside)
        return sum_exp.log() - picked

    @staticmethod
    def backward(ctx, grad):
        softmax, local_t, inside = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, local_t.unsqueeze(-1), -inside.to(g.dtype).unsqueeze(-1))
        return g * grad.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    group: Communicator | None,
    vocab_start: int,
    reduction: str = "sum",
) -> torch.Tensor:
    """Cross-entropy of logits split over the vocabulary across tp, without gathering them.

    ``local_logits[..., j]`` is the logit of token ``vocab_start + j``; every tp rank passes
    the same ``target`` and gets the same loss. Collective over ``group`` (two allreduces).
    """
    if group is None:
        return F.cross_entropy(
            local_logits.reshape(-1, local_logits.shape[-1]).float(), target.reshape(-1), reduction=reduction
        )
    per = _VocabParallelCE.apply(
        local_logits.reshape(-1, local_logits.shape[-1]), target.reshape(-1), group, vocab_start
    )
    return per.sum() if reduction == "sum" else per.mean() if reduction == "mean" else per


# -- applying a plan -------------------------------------------------------------------------
STYLES = ("colwise", "colwise_heads", "colwise_gather", "rowwise", "vocab_embedding")

GPT_PLAN = {
    "tok_emb": "vocab_embedding",
    "blocks.*.attn.qkv": "colwise_heads",  # q, k, v each split by heads
    "blocks.*.attn.proj": "rowwise",
    "blocks.*.mlp.fc": "colwise",
    "blocks.*.mlp.proj": "rowwise",
    "head": "colwise_gather",  # vocabulary-parallel logits, gathered for the task's loss
}
"""The plan for :class:`disttrain.models.gpt.GPT` (module names are that model's contract)."""


def _parallel_module(name, mod, style, parent, group, tp, rank):
    where = f"tensor parallel plan: {name!r} ({type(mod).__name__}) as {style!r}"
    if style == "vocab_embedding":
        if not isinstance(mod, nn.Embedding):
            raise MeshError(f"{where}: expected nn.Embedding")
        if mod.num_embeddings < tp:
            raise MeshError(
                f"{where}: vocabulary of {mod.num_embeddings} cannot be split across tp={tp} ranks"
                f"\nHINT: use tp <= {mod.num_embeddings}"
            )
        return VocabParallelEmbedding(mod, group, tp, rank)
    if not isinstance(mod, nn.Linear):
        raise MeshError(f"{where}: expected nn.Linear")
    if style == "rowwise":
        if mod.in_features < tp:
            raise MeshError(f"{where}: {mod.in_features} input features cannot be split across tp={tp}")
        return RowParallelLinear(mod, group, tp, rank)
    if style == "colwise_heads":
        n_head = getattr(parent, "n_head", None)
        if n_head is None or mod.out_features % 3:
            raise MeshError(f"{where}: expected a fused q/k/v projection inside a module with `n_head`")
        if n_head % tp:
            raise MeshError(
                f"{where}: {n_head} attention heads cannot be split evenly across tp={tp} ranks"
                f"\nHINT: choose tp dividing n_head ({n_head}), or change model.n_head"
            )
        return ColumnParallelLinear(mod, group, tp, rank, partitions=3)
    if mod.out_features < tp:
        raise MeshError(f"{where}: {mod.out_features} output features cannot be split across tp={tp}")
    return ColumnParallelLinear(mod, group, tp, rank, gather_output=style == "colwise_gather")


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh, plan: dict[str, str] | None = None) -> nn.Module:
    """Replace the modules named by ``plan`` (glob over module names -> style) by their
    tensor-parallel versions, in place; returns ``model``. Every rank of the mesh calls it
    after building the same full model (same seed). Local: no communication.

    Styles: ``colwise``, ``colwise_heads`` (a fused q/k/v), ``colwise_gather`` (output
    gathered), ``rowwise`` (input arrives split: pair it after a colwise layer) and
    ``vocab_embedding``. Modules the plan does not name stay replicated.
    """
    tp, rank, group = mesh.size("tp"), mesh.index("tp"), mesh.group("tp")
    if plan is None:
        if not (hasattr(model, "blocks") and hasattr(model, "tok_emb")):
            raise MeshError(
                f"apply_tensor_parallel: no plan for {type(model).__name__}\nHINT: pass a plan naming "
                "modules, e.g. {'net.0': 'colwise', 'net.2': 'rowwise'}"
            )
        plan = GPT_PLAN
    if tp == 1:
        return model
    modules = dict(model.named_modules())
    for pattern, style in plan.items():
        if style not in STYLES:
            raise MeshError(f"tensor parallel plan: {pattern!r}: unknown style {style!r}; known: {', '.join(STYLES)}")
        names = [n for n in modules if n and fnmatch.fnmatchcase(n, pattern)]
        if not names:
            close = difflib.get_close_matches(pattern, [n for n in modules if n], n=3)
            raise MeshError(
                f"tensor parallel plan: {pattern!r} names no module of {type(model).__name__}"
                + (f"\nHINT: did you mean {', '.join(map(repr, close))}?" if close else "")
            )
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            setattr(parent, attr, _parallel_module(name, modules[name], style, parent, group, tp, rank))
    return model


def tp_slice(p: torch.Tensor) -> TPSlice | None:
    """The box of the logical tensor a parameter holds, or None if it is replicated across tp."""
    return getattr(p, "tp_slice", None)

"""Cross-entropy over logits split by vocabulary across the tp group (Megatron's
vocab-parallel cross-entropy): the full logits are never gathered.

A column-parallel head that does not gather its output marks the tensor it returns as a
:class:`VocabShard` (which vocabulary slice, of how many tokens, on which group).
:func:`cross_entropy` is the one loss to call on a model's logits, plain or sharded: the
built-in LM step uses it, and a user's step function can too::

    from disttrain.parallel.tensor.vocab import cross_entropy
    loss_sum = cross_entropy(logits, labels, reduction="sum")   # same value on every tp rank

It is collective over the tp group when the logits are a shard (two allreduces forward).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from collectives import Communicator, ReduceOp

_ATTR = "_disttrain_vocab_shard"


@dataclasses.dataclass(frozen=True)
class VocabShard:
    group: Communicator
    start: int  # first token id of this rank's slice
    vocab: int  # the full vocabulary


def mark_vocab_shard(logits: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    setattr(logits, _ATTR, shard)
    return logits


def vocab_shard(logits: torch.Tensor) -> VocabShard | None:
    """The slice ``logits`` holds when a vocab-parallel head produced it, else None."""
    return getattr(logits, _ATTR, None)


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
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross-entropy of logits split over the vocabulary across tp, without gathering them.

    ``local_logits[..., j]`` is the logit of token ``vocab_start + j``; every tp rank passes
    the same ``target`` and gets the same loss. Targets equal to ``ignore_index`` count zero
    (and are not counted by ``mean``). Collective over ``group`` (two allreduces).
    """
    flat, t = local_logits.reshape(-1, local_logits.shape[-1]), target.reshape(-1)
    if group is None:
        return F.cross_entropy(flat.float(), t, reduction=reduction, ignore_index=ignore_index)
    keep = t != ignore_index
    per = _VocabParallelCE.apply(flat, t.masked_fill(~keep, vocab_start), group, vocab_start)
    per = per * keep.to(per.dtype)
    if reduction == "sum":
        return per.sum()
    if reduction == "mean":
        return per.sum() / keep.sum().clamp(min=1)
    return per


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, reduction: str = "sum", ignore_index: int = -100
) -> torch.Tensor:
    """``F.cross_entropy`` over the last dim of ``logits``, for full logits and for a vocab-parallel
    head's shard alike (then collective over its tp group, and the same value on every tp rank)."""
    shard = vocab_shard(logits)
    if shard is None:
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            target.reshape(-1),
            reduction=reduction,
            ignore_index=ignore_index,
        )
    return vocab_parallel_cross_entropy(logits, target, shard.group, shard.start, reduction, ignore_index)

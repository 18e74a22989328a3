"""The Strategy that composes data x tensor x pipeline parallelism (and ZeRO-1 over dp).

Built by ``build_strategy`` when ``parallel.mesh`` has tp > 1 or pp > 1. Every rank:

1. checks the layout against the world size and the model (:func:`validate_layout`,
   local, so a bad YAML fails the same way on every rank before any communication);
2. builds the mesh (collective), applies tensor parallelism (the tp group splits
   layers) and the pipeline split (keeps its stage's modules);
3. per step: ``forward_backward`` runs the stage's micro-batches (GPipe/1F1B over the pp
   group, or plain accumulation when pp == 1); ``finish_gradients`` sums gradients over
   the dp group (one flat allreduce); ``clip_grad_norm`` adds each distinct gradient
   element once (tp-sliced params on every tp rank, tp-replicated params on tp rank 0,
   dp rank 0 only) and allreduces over the world; ``optimizer_step`` steps, and with
   ZeRO-1 each dp rank steps only the parameters it owns, then broadcasts them.

Ranks of one dp replica (its tp and pp peers) read the same samples (``dp_rank``/``dp_size``
tell the trainer's sampler), and each reports the replica's loss.

Checkpoint state is named like the single-process model (``model.<param>``,
``optim.<param>.<state>``) with boxes of the logical tensors, so a dp2 x tp2 checkpoint
loads into dp4 or tp1 x pp2.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn

from collectives import Communicator, ReduceOp

from ..mesh import MeshError, MeshShape, build_mesh, resolve_shape
from .pipeline_parallel import Pipeline, apply_pipeline_split, gpt_stage_plan
from .strategy import Shard, ShardReader
from .tensor_parallel import GPT_PLAN, apply_tensor_parallel, tp_slice

log = logging.getLogger(__name__)


def validate_layout(model: nn.Module, shape: MeshShape, pipeline_cfg=None) -> None:
    """Refuse a layout the GPT model cannot be split into (heads, layers, vocabulary). Local."""
    tp, pp = shape.tp, shape.pp
    blocks = getattr(model, "blocks", None)
    if tp > 1 and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        # tp peers would draw different dropout masks for the same replicated activations.
        raise MeshError(
            f"layout {shape}: dropout > 0 is not supported with tensor parallelism\nHINT: set model.dropout: 0 or tp: 1"
        )
    if blocks is not None and tp > 1:
        attn = getattr(blocks[0], "attn", None)
        n_head = getattr(attn, "n_head", None)
        if n_head is not None and n_head % tp:
            raise MeshError(
                f"layout {shape}: the model's {n_head} attention heads cannot be split across tp={tp}"
                f"\nHINT: tp must divide model.n_head ({n_head})"
            )
        vocab = getattr(getattr(model, "tok_emb", None), "num_embeddings", None)
        if vocab is not None and vocab < tp:
            raise MeshError(f"layout {shape}: a vocabulary of {vocab} cannot be split across tp={tp}")
    if pp > 1:
        if blocks is None:
            raise MeshError(f"layout {shape}: pipeline parallel needs the GPT structure (blocks)\nHINT: use pp=1")
        if len(blocks) < pp:
            raise MeshError(
                f"layout {shape}: the model has {len(blocks)} blocks, fewer than pp={pp} stages"
                f"\nHINT: use pp <= {len(blocks)} (each stage needs at least one block)"
            )
        gpt_stage_plan(model, pp, getattr(pipeline_cfg, "stages", None))


class _ParallelModule(nn.Module):
    """``strategy.model``: called like the single-process model (evaluation), collectively by
    every rank of the replica; returns the full logits on every rank."""

    def __init__(self, strategy: ModelParallel):
        super().__init__()
        self.module = strategy.inner
        self._strategy = [strategy]  # not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self._strategy[0]
        if s.pipeline is not None:
            return s.pipeline.infer(x, s.vocab)
        return self.module(x)


class ModelParallel:
    def __init__(self, model: nn.Module, make_optimizer, comm: Communicator, cfg, plan: dict | None = None):
        m = cfg.mesh
        shape = resolve_shape(comm.world_size, m.dp, m.tp, m.pp)
        validate_layout(model, shape, cfg.pipeline)
        if cfg.strategy not in ("ddp", "zero1"):
            raise MeshError(
                f"parallel.strategy={cfg.strategy} with tp/pp: only ddp and zero1 compose with model "
                "parallelism here\nHINT: set parallel.strategy: zero1 (optimizer state sharded over dp)"
            )
        self.comm, self.cfg, self.zero = comm, cfg, cfg.strategy == "zero1"
        self.mesh = build_mesh(comm, m.dp, m.tp, m.pp)
        self.dp_rank, self.dp_size = self.mesh.index("dp"), self.mesh.size("dp")
        self.vocab = getattr(getattr(model, "head", None), "out_features", 0)
        if self.mesh.size("tp") > 1:
            apply_tensor_parallel(model, self.mesh, plan if plan is not None else GPT_PLAN)
        self.pipeline = None
        if self.mesh.size("pp") > 1:
            self.stages = gpt_stage_plan(model, shape.pp, cfg.pipeline.stages)
            d_model = model.pos_emb.embedding_dim
            apply_pipeline_split(model, self.stages, self.mesh.index("pp"))
            self.pipeline = Pipeline(model, self.mesh.group("pp"), cfg.pipeline.schedule, d_model)
        self.inner = model
        self.model = _ParallelModule(self)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.owner = self._assign_owners() if self.zero else [self.dp_rank] * len(self.params)
        mine = [p for p, o in zip(self.params, self.owner) if o == self.dp_rank]
        self.optimizer = make_optimizer(mine)
        log.info(
            "rank %d: %r, %d local parameters (%d owned)",
            comm.rank,
            self.mesh,
            sum(p.numel() for p in self.params),
            sum(p.numel() for p in mine),
        )

    def _assign_owners(self) -> list[int]:
        """ZeRO-1: each dp rank owns whole parameters, balanced by size (same on every dp rank)."""
        load = [0] * self.dp_size
        owner = [0] * len(self.params)
        for i in sorted(range(len(self.params)), key=lambda i: (-self.params[i].numel(), i)):
            r = min(range(self.dp_size), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += self.params[i].numel()
        return owner

    # -- the Strategy seam ------------------------------------------------------------------
    def accumulate(self, last: bool):
        return contextlib.nullcontext()

    def forward_backward(self, micro_batches, loss_fn) -> float:
        """Every rank of the world: forward and backward this replica's share of the step."""
        if self.pipeline is None:
            total = 0.0
            for x, y in micro_batches:
                if len(x) == 0:
                    continue
                loss = loss_fn(self.inner(x), y)
                loss.backward()
                total += float(loss.detach())
            return total
        # The pipeline's own micro-batching replaces the trainer's (losses are sums over the
        # global count, so any split gives the same gradient).
        x = torch.cat([b[0] for b in micro_batches])
        y = torch.cat([b[1] for b in micro_batches])
        m = min(self.cfg.pipeline.microbatches, len(x))
        mbs = list(zip(torch.tensor_split(x, m), torch.tensor_split(y, m))) if m else []
        return self.pipeline.run(mbs, loss_fn)

    def finish_gradients(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        group = self.mesh.group("dp")
        if group is None:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in self.params])
        group.allreduce(flat, ReduceOp.SUM)
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n

    def clip_grad_norm(self, max_norm: float) -> float:
        """Collective over the world: the norm of the whole model's gradient, each element once."""
        sq = torch.zeros((), dtype=torch.float64)
        if self.dp_rank == 0:
            tp0 = self.mesh.index("tp") == 0
            for p in self.params:
                if p.grad is not None and (tp0 or tp_slice(p) is not None):
                    sq += p.grad.detach().double().pow(2).sum()
        self.comm.allreduce(sq, ReduceOp.SUM)
        norm = float(sq.sqrt())
        if max_norm > 0:
            coef = max_norm / (norm + 1e-6)
            if coef < 1:
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(coef)
        return norm

    def optimizer_step(self) -> None:
        self.optimizer.step()
        if not self.zero or self.dp_size == 1:
            return
        group = self.mesh.group("dp")
        with torch.no_grad():
            for r in range(self.dp_size):  # each owner broadcasts its updated parameters
                owned = [p for p, o in zip(self.params, self.owner) if o == r]
                if not owned:
                    continue
                flat = torch.cat([p.detach().reshape(-1) for p in owned])
                group.broadcast(flat, src=r)
                if r != self.dp_rank:
                    offset = 0
                    for p in owned:
                        p.copy_(flat[offset : offset + p.numel()].view_as(p))
                        offset += p.numel()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    # -- checkpoints ------------------------------------------------------------------------
    def _pieces(self, p: torch.Tensor, value: torch.Tensor):
        """[(local piece of value, global box)] for a parameter-shaped tensor."""
        sl = tp_slice(p)
        if sl is None:
            return [(value, tuple((0, n) for n in p.shape))], tuple(p.shape)
        return [(value.narrow(sl.dim, ls, le - ls), box) for (ls, le), box in sl.boxes()], sl.global_shape

    def state_shards(self) -> list[Shard]:
        """Model and optimizer state as boxes of the single-process model's tensors. Local."""
        tp_rep = self.mesh.size("tp") > 1
        out = []
        for (name, p), _owner in zip(self.named, self.owner):
            pieces, gshape = self._pieces(p, p.detach())
            rep = self.dp_size > 1 or (tp_rep and tp_slice(p) is None)
            out += [Shard(f"model.{name}", t, gshape, box, replicated=rep) for t, box in pieces]
            for key, v in self.optimizer.state.get(p, {}).items():
                if not isinstance(v, torch.Tensor):
                    continue
                orep = (not self.zero and self.dp_size > 1) or (tp_rep and tp_slice(p) is None)
                if v.shape == p.shape:
                    vp, _ = self._pieces(p, v)
                    out += [Shard(f"optim.{name}.{key}", t, gshape, box, replicated=orep) for t, box in vp]
                else:  # scalars such as Adam's step
                    out.append(
                        Shard(f"optim.{name}.{key}", v, tuple(v.shape), tuple((0, n) for n in v.shape), replicated=True)
                    )
        return out

    def load_state_shards(self, read: ShardReader) -> None:
        """Fill this rank's boxes of every parameter and optimizer state from ``read``. Local."""
        with torch.no_grad():
            for name, p in self.named:
                sl = tp_slice(p)
                for local, box in self._boxes(p):
                    t = read(f"model.{name}", sl.global_shape if sl else tuple(p.shape), box, False)
                    local(p).copy_(t)
        self._materialise_optimizer_state()
        with torch.no_grad():
            for (name, p), owner in zip(self.named, self.owner):
                if owner != self.dp_rank:
                    continue
                sl = tp_slice(p)
                for key, v in self.optimizer.state[p].items():
                    if not isinstance(v, torch.Tensor):
                        continue
                    if v.shape == p.shape:
                        for local, box in self._boxes(p):
                            local(v).copy_(
                                read(f"optim.{name}.{key}", sl.global_shape if sl else tuple(p.shape), box, False)
                            )
                    else:
                        v.copy_(read(f"optim.{name}.{key}", tuple(v.shape), tuple((0, n) for n in v.shape), False))

    def _boxes(self, p):
        sl = tp_slice(p)
        if sl is None:
            return [(lambda t: t, tuple((0, n) for n in p.shape))]
        return [(lambda t, ls=ls, le=le, d=sl.dim: t.narrow(d, ls, le - ls), box) for (ls, le), box in sl.boxes()]

    def _materialise_optimizer_state(self) -> None:
        """Create the optimizer's state tensors (shapes, keys) with a zero-lr step on zero gradients."""
        mine = [p for p, o in zip(self.params, self.owner) if o == self.dp_rank]
        if all(p in self.optimizer.state for p in mine):
            return
        saved = [(g["lr"], g.get("weight_decay")) for g in self.optimizer.param_groups]
        grads = [p.grad for p in mine]
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0
        for p in mine:
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        for g, (lr, _) in zip(self.optimizer.param_groups, saved):
            g["lr"] = lr
        for p, gr in zip(mine, grads):
            p.grad = gr


def build_model_parallel(cfg, model: nn.Module, optim, comm: Communicator) -> ModelParallel:
    """Every rank, collectively: the dp x tp x pp strategy for ``model`` (``cfg`` = parallel section);
    ``optim`` is the :class:`.strategy.OptimizerSpec`."""
    return ModelParallel(model, optim.factory_for(model), comm, cfg)


def uses_model_parallel(cfg) -> bool:
    m = getattr(cfg, "mesh", None)
    return m is not None and (m.tp > 1 or m.pp > 1)

"""The Strategy that composes data x tensor x pipeline parallelism (and ZeRO-1 over dp).

Built by ``build_strategy`` when ``parallel.mesh`` has tp > 1 or pp > 1. Every rank:

1. builds the mesh (collective), applies tensor parallelism by the plan (the model's own,
   or ``parallel.tp.plan``, or ``parallel.tp.parallelize``) and the pipeline split (keeps
   its stages' modules: ``parallel.pipeline``);
2. per step: ``forward_backward`` runs the micro-batches (GPipe / 1F1B / interleaved over
   the pp group, or plain accumulation when pp == 1); ``finish_gradients`` sums partial
   gradients (sequence-parallel norms over tp, tied weights over the stages that hold
   them) and then over dp; ``clip_grad_norm`` adds each distinct gradient element once and
   allreduces over the world; ``optimizer_step`` steps, and with ZeRO-1 each dp rank steps
   only the parameters it owns, then broadcasts them.

Ranks of one dp replica (its tp and pp peers) read the same samples (``dp_rank``/``dp_size``
tell the trainer's sampler), and each reports the replica's loss.

Checkpoint state is named like the single-process model (``model.<param>``,
``optim.<param>.<state>``, ``model.<buffer>``) with boxes of the logical tensors, so a
tp2 x pp2 checkpoint loads into dp4 or into one process; ``rng.tp_sharded`` holds the dropout
stream of sharded regions of each (pp, tp) coordinate (the same on every dp replica, so a checkpoint
loads at another dp degree with its streams; another tp x pp reseeds them).
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn

from collectives import Communicator, ReduceOp

from ..config.parallel import ParallelConfig
from ..errors import DisttrainError
from .buffers import broadcast_parameters
from .mesh import MeshError, build_mesh, resolve_shape
from .model_layout import apply_model_parallel
from .pipeline.step import as_model_output, is_transformers_model
from .strategy import OptimizerSpec, Shard, ShardReader
from .tensor.parallel import TPContext, is_partial_grad, tp_slice
from .tensor.rng_tracker import RNGTracker

log = logging.getLogger(__name__)

SUPPORTED = ("ddp", "zero1")
RNG_KEY = "rng.tp_sharded"  # (pp, tp, state bytes): each (pp, tp) coordinate's dropout stream of sharded regions


def _split_batch(x, m: int) -> list:
    """Split a batch (tensor, or tuples/lists/dicts of them) into ``m`` micro-batches along dim 0."""
    if isinstance(x, torch.Tensor):
        return list(torch.tensor_split(x, m))
    if isinstance(x, dict):
        parts = {k: _split_batch(v, m) for k, v in x.items()}
        return [{k: parts[k][i] for k in x} for i in range(m)]
    if isinstance(x, tuple | list):
        parts = [_split_batch(v, m) for v in x]
        return [type(x)(p[i] for p in parts) for i in range(m)]
    return [x] * m


def _cat_batches(xs: list):
    if isinstance(xs[0], torch.Tensor):
        return torch.cat(xs)
    if isinstance(xs[0], dict):
        return {k: _cat_batches([x[k] for x in xs]) for k in xs[0]}
    if isinstance(xs[0], tuple | list):
        return type(xs[0])(_cat_batches([x[i] for x in xs]) for i in range(len(xs[0])))
    return xs[0]


class _ParallelModule(nn.Module):
    """``strategy.model``: called like the single-process model (evaluation), collectively by
    every rank of the replica; returns the model's output on every rank (logits possibly
    split by vocabulary: score them with :func:`disttrain.parallel.tensor.vocab.cross_entropy`)."""

    def __init__(self, strategy: ModelParallel):
        super().__init__()
        self.module = strategy.inner
        self._strategy = [strategy]  # not a submodule

    def forward(self, *args, **kwargs):
        s = self._strategy[0]
        if s.pipeline is not None:
            kwargs = {k: v for k, v in kwargs.items() if v is not None}
            if len(args) + len(kwargs) != 1:
                raise MeshError(
                    f"pipeline parallel: the model is called with {len(args)} positional and {sorted(kwargs)} keyword "
                    "arguments; a pipeline's first stage takes one input\nHINT: call model(input_ids)"
                )
            out = s.pipeline.infer(args[0] if args else next(iter(kwargs.values())))
            return as_model_output(is_transformers_model(self.module), out)
        s._reset_rng()
        try:
            return self.module(*args, **kwargs)
        finally:
            s._reset_rng()


class ModelParallel:
    schedules_micro_batches = False  # tp/dp only: the trainer's own loop drives it

    def __init__(
        self,
        model: nn.Module,
        optim,
        comm: Communicator,
        cfg: ParallelConfig,
        seed: int | None = None,
        loss_parallel: bool | None = None,
    ):
        """Every rank, collectively. ``optim``: an OptimizerSpec (or a factory over parameters);
        ``cfg``: the ``parallel`` config section; ``seed``: the run seed (default: torch's initial seed);
        ``loss_parallel``: overrides ``cfg.tp.loss_parallel`` (None there: on)."""
        m = cfg.mesh
        shape = resolve_shape(comm.world_size, m.dp, m.tp, m.pp)
        if cfg.strategy not in SUPPORTED:
            raise MeshError(
                f"parallel.strategy={cfg.strategy} with tp/pp: supported with model parallelism: "
                f"{', '.join(SUPPORTED)}\nHINT: set parallel.strategy: zero1 (optimizer state sharded over dp)"
            )
        self.comm, self.cfg, self.zero = comm, cfg, cfg.strategy == "zero1"
        broadcast_parameters(model, comm)  # every rank starts from rank 0's parameters and buffers
        self.mesh = build_mesh(comm, m.dp, m.tp, m.pp)
        self.dp_rank, self.dp_size = self.mesh.index("dp"), self.mesh.size("dp")
        tp = shape.tp
        seed = torch.initial_seed() if seed is None else seed
        # The dropout streams live on the model's device (the CUDA generator for a model on a GPU); a
        # deferred model is still on meta here, and materialises where the backend moves tensors.
        first = next(model.parameters(), None)
        device = str(first.device) if first is not None and first.device.type != "meta" else None
        device = device or str(comm.backend.device or "cpu")
        self.rng = RNGTracker(seed, self.mesh.index("tp"), self.mesh.index("pp"), device) if tp > 1 else None
        self.tp_ctx = TPContext(self.mesh.group("tp"), tp, self.mesh.index("tp"), rng=self.rng)
        laid = apply_model_parallel(model, cfg, comm, self.mesh, shape, self.tp_ctx, loss_parallel, self._reset_rng)
        model, self.pipeline, self.tied, self._buffers = laid.model, laid.pipeline, laid.tied, laid.buffers
        self.logical_buffers = laid.logical_buffers
        logical, owned, held_by_other_first = laid.logical, laid.owned, laid.skip_in_norm
        self.inner = model
        self.model = _ParallelModule(self)
        self.named = [(logical[i], p) for i, p in owned.items() if p.requires_grad]
        # Frozen parameters (a base model under LoRA adapters): in checkpoints, never in the optimizer.
        self.frozen = [(logical[i], p) for i, p in owned.items() if not p.requires_grad]
        self.params = [p for _, p in self.named]
        self._count_in_norm = [n not in held_by_other_first for n, _ in self.named]
        self.owner = self._assign_owners() if self.zero else [self.dp_rank] * len(self.params)
        mine_named = [(n, p) for (n, p), o in zip(self.named, self.owner) if o == self.dp_rank]
        if isinstance(optim, OptimizerSpec):
            self.optimizer = optim.build_for(mine_named)
        else:
            self.optimizer = optim([p for _, p in mine_named])
        log.info(
            "rank %d: %r, %d local parameters (%d owned)",
            comm.rank,
            self.mesh,
            sum(p.numel() for p in self.params),
            sum(p.numel() for _, p in mine_named),
        )

    def _reset_rng(self) -> None:
        if self.rng is not None:
            self.rng.enter_replicated()

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

    def finish_gradients(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        tp = self.mesh.group("tp")
        partial = [p for p in self.params if is_partial_grad(p)]
        if tp is not None and partial:  # sequence-parallel norms: each tp rank saw 1/tp of the tokens
            self._allreduce_grads(partial, tp)
        by_name = dict(self.named)
        groups: dict[int, tuple[Communicator, list]] = {}
        for name, g in self.tied:
            if name in by_name:
                groups.setdefault(id(g), (g, []))[1].append(by_name[name])
        for g, ps in groups.values():
            self._allreduce_grads(ps, g)
        dp = self.mesh.group("dp")
        if dp is not None:
            self._allreduce_grads(self.params, dp)

    @staticmethod
    def _allreduce_grads(params: list, group: Communicator) -> None:
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        group.allreduce(flat, ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n

    def grad_tensors(self) -> list[torch.Tensor]:
        """This rank's gradients (for fp16 loss scaling: unscale and the inf/NaN check)."""
        return [p.grad for p in self.params if p.grad is not None]

    def clip_grad_norm(self, max_norm: float) -> float:
        """Collective over the world: the norm of the whole model's gradient, each element once."""
        sq = torch.zeros((), dtype=torch.float64, device=self.comm.backend.device or "cpu")
        if self.dp_rank == 0:
            tp0 = self.mesh.index("tp") == 0
            for p, count in zip(self.params, self._count_in_norm):
                if count and p.grad is not None and (tp0 or tp_slice(p) is not None):
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

    def _persistent_buffers(self) -> dict[str, torch.Tensor]:
        skip = {n for n, _ in self._non_persistent()}
        return {n: b for n, b in self._buffers.items() if n not in skip}

    def _non_persistent(self):
        for name, mod in self.inner.named_modules():
            for b in getattr(mod, "_non_persistent_buffers_set", ()):
                yield (f"{name}.{b}" if name else b), None

    def state_shards(self) -> list[Shard]:
        """Model, buffers, optimizer and the tp dropout stream as boxes of logical tensors. Local."""
        tp_rep = self.mesh.size("tp") > 1
        tied = {n for n, _ in self.tied}  # held by several pp stages (an LM head tied to the embedding)
        out = []
        for (name, p), _owner in zip(self.named, self.owner):
            pieces, gshape = self._pieces(p, p.detach())
            rep = self.dp_size > 1 or (tp_rep and tp_slice(p) is None) or name in tied
            out += [Shard(f"model.{name}", t, gshape, box, replicated=rep) for t, box in pieces]
            for key, v in self.optimizer.state.get(p, {}).items():
                if not isinstance(v, torch.Tensor):
                    continue
                orep = (not self.zero and self.dp_size > 1) or (tp_rep and tp_slice(p) is None) or name in tied
                if v.shape == p.shape:
                    vp, _ = self._pieces(p, v)
                    out += [Shard(f"optim.{name}.{key}", t, gshape, box, replicated=orep) for t, box in vp]
                else:  # scalars such as Adam's step
                    out.append(
                        Shard(f"optim.{name}.{key}", v, tuple(v.shape), tuple((0, n) for n in v.shape), replicated=True)
                    )
        for name, p in self.frozen:
            pieces, gshape = self._pieces(p, p.detach())
            rep = self.dp_size > 1 or (tp_rep and tp_slice(p) is None) or name in tied
            out += [Shard(f"model.{name}", t, gshape, box, replicated=rep) for t, box in pieces]
        for name, b in self._persistent_buffers().items():
            out.append(
                Shard(f"model.{name}", b.detach(), tuple(b.shape), tuple((0, n) for n in b.shape), replicated=True)
            )
        if self.rng is not None:  # by (pp, tp) coordinate: dp replicas draw the same stream, so it reshards over dp
            st = self.rng.state()
            shape, box = self._rng_box(st.numel())
            out.append(Shard(RNG_KEY, st.view(1, 1, -1), shape, box, replicated=self.dp_size > 1))
        return out

    def load_state_shards(self, read: ShardReader) -> None:
        """Fill this rank's boxes of every parameter, buffer and optimizer state from ``read``. Local."""
        with torch.no_grad():
            for name, p in [*self.named, *self.frozen]:
                sl = tp_slice(p)
                for local, box in self._boxes(p):
                    t = read(f"model.{name}", sl.global_shape if sl else tuple(p.shape), box, False)
                    local(p).copy_(t)
            for name, b in self._persistent_buffers().items():
                b.copy_(read(f"model.{name}", tuple(b.shape), tuple((0, n) for n in b.shape), False))
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
        if self.rng is not None:
            n, w, r = self.rng.state().numel(), self.comm.world_size, self.comm.rank
            try:
                self.rng.load(read(RNG_KEY, *self._rng_box(n), False)[0, 0])
            except (KeyError, ValueError, DisttrainError) as exc:
                try:  # written before the streams were keyed by coordinate: one per rank, same world only
                    self.rng.load(read(RNG_KEY, (w, n), ((r, r + 1), (0, n)), False)[0])
                except (KeyError, ValueError, DisttrainError):  # another tp x pp wrote it: a fresh stream
                    log.warning("rank %s: tp dropout stream not restored (%s); reseeded", self.comm.env.where, exc)

    def _rng_box(self, n: int) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
        """The global shape of the dropout streams and this rank's box: its (pp, tp) coordinate."""
        pp, tp = self.mesh.index("pp"), self.mesh.index("tp")
        return (self.mesh.size("pp"), self.mesh.size("tp"), n), ((pp, pp + 1), (tp, tp + 1), (0, n))

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
        saved = [g["lr"] for g in self.optimizer.param_groups]
        grads = [p.grad for p in mine]
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0
        for p in mine:
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        for g, lr in zip(self.optimizer.param_groups, saved):
            g["lr"] = lr
        for p, gr in zip(mine, grads):
            p.grad = gr


class PipelineParallel(ModelParallel):
    """ModelParallel with pp > 1: it schedules the micro-batches itself (``forward_backward``)."""

    schedules_micro_batches = True

    def forward_backward(self, micro_batches, loss_fn, loss_scale: float = 1.0) -> float:
        """Every rank of the world: forward and backward this replica's share of the step.
        ``micro_batches``: [(input, target)]; ``loss_fn(output, target)`` -> a scalar loss;
        gradients are of ``loss * loss_scale`` (fp16). Returns the unscaled loss sum."""
        # The pipeline's own micro-batching replaces the trainer's (losses are sums over the
        # global count, so any split gives the same gradient).
        x = _cat_batches([b[0] for b in micro_batches])
        y = _cat_batches([b[1] for b in micro_batches])
        n = len(y) if isinstance(y, torch.Tensor) else self.cfg.pipeline.microbatches
        m = min(self.cfg.pipeline.microbatches, n)
        mbs = list(zip(_split_batch(x, m), _split_batch(y, m))) if m else []
        loss = self.pipeline.run(mbs, loss_fn, loss_scale)
        self._reset_rng()
        return loss

    def split_micro_batches(self, batches: list) -> list:
        """This replica's batches (any nesting of tensors) re-cut into ``pipeline.microbatches`` pieces."""
        whole = _cat_batches(batches)
        first = whole
        while isinstance(first, dict | tuple | list):
            first = next(iter(first.values())) if isinstance(first, dict) else first[0]
        n = len(first) if isinstance(first, torch.Tensor) else self.cfg.pipeline.microbatches
        return _split_batch(whole, min(self.cfg.pipeline.microbatches, n)) if n else []

    def forward_backward_micro(self, micro_batches: list, loss_fn, loss_scale: float = 1.0) -> float:
        """Every rank: run exactly these (input, target) micro-batches through the pipeline."""
        loss = self.pipeline.run(micro_batches, loss_fn, loss_scale)
        self._reset_rng()
        return loss

    def last_stage_broadcast(self, values: list[float]) -> list[float]:
        """Collective over the pp group: the last stage's ``values`` on every stage."""
        t = torch.tensor(values, dtype=torch.float64)
        self.mesh.group("pp").broadcast(t, src=self.mesh.size("pp") - 1)
        return t.tolist()


def build_model_parallel(
    cfg: ParallelConfig,
    model: nn.Module,
    optim,
    comm: Communicator,
    seed: int | None = None,
    loss_parallel: bool | None = None,
) -> ModelParallel:
    """Every rank, collectively: the dp x tp x pp strategy for ``model`` (``cfg`` = parallel section);
    ``optim``: the OptimizerSpec (or a factory). With pp > 1 it schedules micro-batches itself."""
    cls = PipelineParallel if cfg.mesh.pp > 1 else ModelParallel
    return cls(model, optim, comm, cfg, seed=seed, loss_parallel=loss_parallel)


def uses_model_parallel(cfg: ParallelConfig) -> bool:
    return cfg.mesh.tp > 1 or cfg.mesh.pp > 1

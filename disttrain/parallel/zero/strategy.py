"""ZeRO stages 1, 2 and 3 (``parallel.strategy: zero1|zero2|zero3``).

Parameters are grouped into :class:`FlatUnit` s, each sharded evenly over ranks; the
optimizer (any elementwise torch optimizer: AdamW, SGD, ...) steps only this rank's
``master`` slices, so its state is 1/N of the whole (stage 1+).

- Stage 1: gradients live in full bucket buffers (``GradBuckets``, one per unit, allreduced
  from backward hooks as in data parallel, nothing sent until the last micro-batch); each
  rank steps its slice, then an allgather refreshes everybody's full parameters.
- Stage 2: each gradient is copied into its unit's transient full buffer as autograd
  produces it (and ``param.grad`` dropped); a full unit is reduce-scattered (async), and
  only this rank's shard of the gradient is kept. Reduced every micro-batch (as DeepSpeed
  does), so no full gradient outlives a backward.
- Stage 3: units are the model's blocks (``parallel.zero.units``, default from
  :func:`.units.find_units`: transformer blocks, else top-level children) plus a root unit for
  the rest (and for any parameter shared between a block and something outside it). A
  block's parameters are gathered right before its forward (forward pre-hook) and freed after
  it, gathered again when the gradient reaches the block's output (a tensor hook: just before
  its backward) and freed
  once all its gradients are in; the next block (forward) or previous block (backward) is
  prefetched. Gathers and reduce-scatters run on two communicators of their own, so their
  relative order may differ between ranks (e.g. a parameter unused on one rank).

Units' reduce-scatters launch strictly in unit order; whatever did not fire (parameters
with no gradient) is launched with zeros when the micro-batch's ``accumulate`` context
exits, so nothing hangs. Gradient clipping sums squared shard norms over ranks.
Checkpoint shards are ``flat=True`` pieces of each logical parameter and its state; buffers
(and frozen parameters) are whole and replicated, broadcast from rank 0 at start and after each
step (``parallel.broadcast_buffers``). Parameters with different optimizer options
(``OptimizerSpec.group_of``) live in separate runs of each flat unit, stepped in separate groups.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn

from collectives import CollectiveMismatchError, CollectiveTimeoutError, Communicator

from ...config.parallel import ParallelConfig
from ...errors import DisttrainError
from ..buckets import WIRE_DTYPES, GradBuckets, clip_, plan_buckets
from ..buffers import broadcast_buffers, broadcast_parameters, buffer_shards, full_box, load_buffers
from ..optim_state import materialize_state, optimizer_bytes, state_tensors, track_state_bytes
from ..strategy import OptimizerSpec, Shard, ShardReader
from ..units import find_units
from .flat_unit import FlatUnit

log = logging.getLogger(__name__)


def _block_groups(model: nn.Module, blocks: list[nn.Module], named: list[tuple[str, nn.Parameter]]):
    """Parameters of each block, and the rest (the root unit). A parameter reachable from outside
    its block (tied to another block or to the root) goes to the root, which stays gathered all step."""
    paths = {id(m): n for n, m in model.named_modules()}
    names_of: dict[nn.Parameter, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(p, []).append(n)
    taken: set = set()
    groups = []
    for b in blocks:
        prefix = paths[id(b)] + "."
        g = [(n, p) for n, p in named if p not in taken and all(x.startswith(prefix) for x in names_of[p])]
        taken.update(p for _, p in g)
        groups.append(g)
    return groups, [(n, p) for n, p in named if p not in taken]


class UnevenForwardsError(DisttrainError):
    """ZeRO-3 ranks ran different forwards (one rank an extra ``no_grad`` forward): their gathers no
    longer pair up."""


class Zero:
    schedules_micro_batches = False

    def __init__(
        self,
        stage: int,
        model: nn.Module,
        optim: OptimizerSpec,
        comm: Communicator,
        cfg: ParallelConfig,
        blocks: list[nn.Module] | None = None,
    ):
        """Every rank, collectively. ``blocks``: the ZeRO-3 units (default: :func:`.units.find_units`)."""
        self.stage, self.model, self.comm, self.cfg = stage, model, comm, cfg
        self.dp_rank, self.dp_size = comm.rank, comm.world_size
        self.wire = WIRE_DTYPES[cfg.grad_dtype]
        self.sync_buffers = cfg.broadcast_buffers and not cfg.sync_batchnorm and comm.world_size > 1
        broadcast_parameters(self.model, self.comm)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        name_of = {p: n for n, p in named}
        options = {p: optim.options(n, p) for n, p in named}
        self.blocks: list[nn.Module] = []
        self.root: FlatUnit | None = None  # ZeRO-3: the unit of everything outside the blocks
        if stage == 3:
            self.blocks = blocks if blocks is not None else [m for _, m in find_units(model, cfg.zero.units)]
            self.blocks = [b for b in self.blocks if b is not model]
            groups, rest = _block_groups(model, self.blocks, named)
            keep = [i for i, g in enumerate(groups) if g]  # a block whose parameters are all tied elsewhere
            self.blocks, groups = [self.blocks[i] for i in keep], [groups[i] for i in keep]
            frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
            fgroups, frest = _block_groups(model, self.blocks, frozen)
            groups.append(rest)  # the root unit, last
            fgroups.append(frest)
            modules = [*self.blocks, model]
        else:
            groups = [
                [(name_of[p], p) for p in g]
                for g in plan_buckets([p for _, p in named], cfg.bucket_mb, cfg.first_bucket_mb)
            ]
            modules = [None] * len(groups)
        self.units = []
        self.frozen_units: list[FlatUnit] = []  # ZeRO-3: frozen parameters, sharded, each its unit's companion
        for i, (g, m) in enumerate(zip(groups, modules)):
            f = fgroups[i] if stage == 3 else []
            if not g and not f:
                continue
            u = FlatUnit(i, g, comm, stage == 3, m, [options[p] for _, p in g])
            if f:
                u.companion = FlatUnit(i, f, comm, True, m, frozen=True)
                self.frozen_units.append(u.companion)
            self.units.append(u)
        self._where = {p: (u, i) for u in self.units for i, p in enumerate(u.params)}
        self.masters = [piece for u in self.units for _, piece, _, _ in u.pieces]
        self.buckets = None
        if stage == 1:
            self.buckets = GradBuckets(
                [p for u in self.units for p in u.params],
                comm,
                cfg,
                pad_to=comm.world_size,
                groups=[u.params for u in self.units],
            )
            for u, b in zip(self.units, self.buckets.buckets):
                u.set_grad(b.buf[u.lo : u.hi])
        else:
            for u in self.units:
                u.set_grad(u.gshard)
            self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for u in self.units for p in u.params]
            self.rs_comm = comm.new_group(list(range(comm.world_size)))
        if stage == 3:
            self.ag_comm = comm.new_group(list(range(comm.world_size)))
            self._install_forward_hooks()
        by_options: dict[tuple, list[nn.Parameter]] = {}
        for opts in dict.fromkeys(options[p] for _, p in named):  # the same group order on every rank
            by_options[opts] = []
        for u in self.units:
            for opts, piece, _, _ in u.pieces:
                by_options.setdefault(opts, []).append(piece)
        self.optimizer = optim.build([{"params": ps, **dict(o)} for o, ps in by_options.items() if ps])
        self._next_rs = 0
        self._fresh = True  # the next reduce-scatter overwrites the gradient shards (first micro-batch)
        self._dirty = False
        self._forwards = 0
        self._no_grad_forwards = 0  # ZeRO-3: forwards without gradients so far (agreed across ranks)
        self._awaiting_backward = False  # a training forward ran and its micro-batch is not flushed yet
        self.peak_state_bytes = 0  # params+grads+optimizer state, bytes, after the first steps
        self._steps = 0
        self.peak_transient_bytes = 0

    # -- stage 3: gather before use, free after --------------------------------------------
    def _install_forward_hooks(self) -> None:
        self.root = self.units[-1]
        self.block_units = self.units[:-1] if self.root.module is self.model else self.units
        self.model.register_forward_pre_hook(self._root_pre)
        self.model.register_forward_hook(self._root_post)
        for i, u in enumerate(self.block_units):
            u.module.register_forward_pre_hook(lambda m, a, i=i: self._block_pre(i))
            u.module.register_forward_hook(lambda m, a, out, i=i: self._block_post(i, out))

    def _ensure(self, u: FlatUnit) -> None:
        with self._paired(f"the gather of unit {u.index}"):
            u.start_gather(self.ag_comm)
            u.wait_gather()
        self.peak_transient_bytes = max(self.peak_transient_bytes, self._transient_bytes())

    def _prefetch(self, i: int) -> None:
        if 0 <= i < len(self.block_units):
            with self._paired(f"the gather of unit {self.block_units[i].index}"):
                self.block_units[i].start_gather(self.ag_comm)

    @contextlib.contextmanager
    def _paired(self, what: str):
        """ZeRO-3's gathers pair up across ranks only if every rank runs the same forwards: a mismatch
        or a missing peer there is most likely one rank's extra forward (an uneven evaluation loop)."""
        try:
            yield
        except (CollectiveMismatchError, CollectiveTimeoutError) as exc:
            raise UnevenForwardsError(
                f"rank {self.comm.env.where}: ZeRO-3 {what} (after {self._no_grad_forwards} forwards without "
                f"gradients on this rank) did not pair up with the other ranks: {exc}\nHINT: every rank must "
                "run the same number of forwards under zero3, with and without gradients, in the same order "
                "(each forward gathers the parameters collectively); give every rank the same number of "
                "evaluation batches"
            ) from exc

    def _agree_no_grad(self) -> None:
        """Collective on the gather group: a forward without gradients starts with a small allgather of
        its count, so it never pairs silently with a peer's training forward (the checked collectives
        name both call sites) and a peer that stopped forwarding is a timeout naming it."""
        self._no_grad_forwards += 1
        mine = torch.tensor([self._no_grad_forwards], dtype=torch.int64)
        counts = [torch.empty_like(mine) for _ in range(self.dp_size)]
        with self._paired("check of a forward without gradients"):
            self.ag_comm.allgather(counts, mine)
        if any(int(c) != self._no_grad_forwards for c in counts):
            seen = {r: int(c) for r, c in enumerate(counts)}
            raise UnevenForwardsError(
                f"rank {self.comm.env.where}: forwards without gradients so far, by rank: {seen}\nHINT: every "
                "rank must run the same number of forwards under zero3; give every rank the same number of "
                "evaluation batches"
            )

    def _root_pre(self, module, args) -> None:
        if not (torch.is_grad_enabled() and module.training):
            # Evaluation (or any forward without gradients) gathers unit by unit as training does: the
            # root for the whole forward, each block around its own forward. Collective: every rank runs
            # the same number of such forwards (the trainer's evaluate gives each the same count).
            self._agree_no_grad()
            if self.root.module is self.model:
                self._ensure(self.root)
            self._prefetch(0)
            return
        self._forwards += 1
        self._awaiting_backward = True
        if self.root.module is self.model:
            self._ensure(self.root)
        self._prefetch(0)

    def _root_post(self, module, args, out) -> None:
        # Training keeps the root gathered until the backward is done (``_flush``); a forward without
        # gradients frees it, unless a training forward of this micro-batch still awaits its backward.
        if not (torch.is_grad_enabled() and module.training) and not self._awaiting_backward:
            if self.root.module is self.model:
                self.root.free()

    def _block_pre(self, i: int) -> None:
        self._ensure(self.block_units[i])
        self._prefetch(i + 1)

    def _block_post(self, i: int, out) -> None:
        training = torch.is_grad_enabled()
        if training:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda g, i=i: self._pre_backward(i))
        if not training or i != len(self.block_units) - 1:  # the last block is needed first in backward
            self.block_units[i].free()

    def _pre_backward(self, i: int) -> None:
        # A block with frozen weights may still use them after its last gradient (the input's gradient
        # goes through the frozen weight): it is freed once the gradient reaches the block before it.
        nxt = self.block_units[i + 1] if i + 1 < len(self.block_units) else None
        if nxt is not None and nxt.companion is not None:
            nxt.free()
        self._ensure(self.block_units[i])
        self._prefetch(i - 1)

    def _replay_gathers(self) -> None:
        """A micro-batch with no samples on this rank: take part in the gathers its peers' forward and
        backward issue (root, blocks 0..L-1, then L-2..0 in backward; the last block is kept)."""
        n = len(self.block_units)
        seq = (
            ([self.root] if self.root.module is self.model else [])
            + self.block_units
            + self.block_units[: max(n - 1, 0)][::-1]
        )
        for u in seq:
            self._ensure(u)
            u.free()

    def _free_all(self) -> None:
        for u in self.units:
            u.free()

    def _transient_bytes(self) -> int:
        return sum(u.gathered_bytes() + (u.gfull.numel() * 4 if u.gfull is not None else 0) for u in self.units)

    # -- stage 2/3: gradients into shards ----------------------------------------------------
    def _on_grad(self, p: nn.Parameter) -> None:
        u, i = self._where[p]
        u.take_grad(i, p.grad)
        p.grad = None
        self._dirty = True
        u.ready += 1
        if u.ready == len(u.params):
            self.peak_transient_bytes = max(self.peak_transient_bytes, self._transient_bytes())
            if self.stage == 3 and u is not self.root and u.companion is None:
                u.free()  # every op that used these parameters has run its backward
            order = self._rs_order()
            while self._next_rs < len(order) and order[self._next_rs].ready >= len(order[self._next_rs].params):
                order[self._next_rs].start_reduce_scatter(self.rs_comm, self.wire, self._fresh)
                self._next_rs += 1

    def _rs_order(self) -> list[FlatUnit]:
        # Stage 2 units are already in backward order; stage 3 blocks finish last-to-first, then the root.
        return self.units if self.stage == 2 else [*reversed(self.block_units), *self.units[len(self.block_units) :]]

    def _flush(self) -> None:
        """End of a micro-batch's backward (stage 2/3): launch the rest, wait, keep the shards. Collective."""
        order = self._rs_order()
        while self._next_rs < len(order):
            order[self._next_rs].start_reduce_scatter(self.rs_comm, self.wire, self._fresh)
            self._next_rs += 1
        for u in order:
            u.wait_reduce_scatter(self._fresh)
        self._next_rs, self._fresh, self._dirty, self._awaiting_backward = 0, False, False, False
        if self.stage == 3:
            self._free_all()

    @contextlib.contextmanager
    def accumulate(self, last: bool):
        """One micro-batch. Stage 1 communicates after the last only; stages 2/3 reduce each one on exit."""
        if self.stage == 1:
            with self.buckets.accumulate(last):
                yield
            return
        self._forwards = 0
        try:
            yield
        finally:
            if self.stage == 3 and self._forwards == 0:
                self._replay_gathers()
            self._flush()

    def finish_gradients(self) -> None:
        """Complete the gradient reduction. Collective, blocks."""
        if self.stage == 1:
            self.buckets.finish()
        elif self._dirty:
            self._flush()
        if self.sync_buffers:
            broadcast_buffers(self.model, self.comm)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global norm: squared norms of this rank's shards, summed over ranks (an allreduce)."""
        return clip_([m.grad for m in self.masters], max_norm, self.comm)

    def grad_tensors(self) -> list[torch.Tensor]:
        """This rank's gradient shards (what its optimizer steps with)."""
        return [m.grad for m in self.masters]

    def optimizer_step(self) -> None:
        self.optimizer.step()
        if self.stage < 3:
            works = [u.refresh_full(self.comm) for u in self.units]
            for w in works:
                w.wait()
        self._steps += 1
        self.peak_state_bytes = track_state_bytes(self, self._steps, self.peak_state_bytes)

    def zero_grad(self) -> None:
        if self.stage == 1:
            self.buckets.zero()
        else:
            for u in self.units:
                u.gshard.zero_()
        self._fresh = True

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def memory_bytes(self) -> dict[str, int]:
        """This rank's bytes of parameters (full buffers, or masters + gathered for stage 3),
        gradients (buckets or shards) and optimizer state, now."""
        if self.stage == 3:
            gathered = sum(u.gathered_bytes() for u in self.units)
            masters = [*self.units, *self.frozen_units]
            params = sum(u.master.numel() * u.master.element_size() for u in masters) + gathered
        else:
            frozen = sum(p.numel() * p.element_size() for p in self.model.parameters() if not p.requires_grad)
            params = sum(u.full.numel() * 4 for u in self.units) + frozen
        grads = self.buckets.nbytes() if self.stage == 1 else sum(u.gshard.numel() * 4 for u in self.units)
        return {"params": params, "grads": grads, "optim": optimizer_bytes(self.optimizer)}

    @torch.no_grad()
    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter, whole (stage 3 gathers each unit: collective)."""
        out = {}
        for u in self.units:
            was = u.gathered
            if not was:
                self._ensure(u)
            for n, p in zip(u.names, u.params):
                out[n] = p.detach().clone()
            if not was:
                u.free()
        return out

    # -- checkpoints (see strategy.Shard) --------------------------------------------------
    def _pieces(self, units: list[FlatUnit] | None = None):
        """(unit, name, param, [a, b) in the param's flat index, [a, b) in the master) for owned pieces."""
        for u in self.units if units is None else units:
            for n, p, o in zip(u.names, u.params, u.offsets):
                a, b = max(o, u.lo), min(o + p.numel(), u.hi)
                if a < b:
                    yield u, n, p, (a - o, b - o), (a - u.lo, b - u.lo)

    def state_shards(self) -> list[Shard]:
        """Flat pieces of each parameter and its optimizer state that this rank owns; buffers whole. Local."""
        out = []
        for u, n, p, box, (s, e) in self._pieces():
            out.append(Shard(f"model.{n}", u.master[s:e], tuple(p.shape), (box,), flat=True))
            piece, o = u.piece_at(s)
            for k, v in state_tensors(self.optimizer, piece).items():
                if v.dim() == 0:
                    out.append(Shard(f"optim.{n}.{k}", v, (), (), replicated=True))
                else:
                    out.append(Shard(f"optim.{n}.{k}", v[s - o : e - o], tuple(p.shape), (box,), flat=True))
        for u, n, p, box, (s, e) in self._pieces(self.frozen_units):  # frozen: this rank's flat range
            out.append(Shard(f"model.{n}", u.master[s:e], tuple(p.shape), (box,), flat=True))
        return out + buffer_shards(self.model, self._sharded_frozen())

    def _sharded_frozen(self) -> set[str]:
        return {n for u in self.frozen_units for n in u.names}

    def load_state_shards(self, read: ShardReader) -> None:
        """Read this rank's pieces (stages 1/2 read whole parameters, since every rank holds them). Local."""
        with torch.no_grad():
            if self.stage < 3:
                for u in self.units:
                    for n, p in zip(u.names, u.params):
                        p.copy_(read(f"model.{n}", tuple(p.shape), full_box(p.shape), False))
            else:
                for u, n, p, box, (s, e) in self._pieces():
                    u.master[s:e].copy_(read(f"model.{n}", tuple(p.shape), (box,), True).reshape(-1))
                for u, n, p, box, (s, e) in self._pieces(self.frozen_units):
                    u.master[s:e].copy_(read(f"model.{n}", tuple(p.shape), (box,), True).reshape(-1))
            load_buffers(self.model, read, self._sharded_frozen())
            materialize_state(self.optimizer)
            for u, n, p, box, (s, e) in self._pieces():
                piece, o = u.piece_at(s)
                for k, v in state_tensors(self.optimizer, piece).items():
                    if v.dim() == 0:
                        v.copy_(read(f"optim.{n}.{k}", (), (), False))
                    else:
                        v[s - o : e - o].copy_(read(f"optim.{n}.{k}", tuple(p.shape), (box,), True).reshape(-1))

"""A flat unit: a group of parameters stored as one flat buffer of their dtype, sharded evenly over ranks.

The unit's logical layout is its parameters back to back (``offsets``), padded with zeros
to a multiple of the world size. Rank r owns ``[r*S, (r+1)*S)`` (``lo``/``hi``), where
S = padded/world: its ``master`` is that slice. Parameters with different optimizer options
(``OptimizerSpec.group_of``: e.g. no weight decay for biases) come in contiguous runs, and the
master is cut at run boundaries into ``pieces``: one ``nn.Parameter`` view per run this rank
touches, each stepped in its own optimizer param group (the padding rides with the last run).

Every model parameter becomes a view into ``full`` (``param.data = full[o:o+n]``); the
parameter keeps its identity and its autograd version counter, so ``named_parameters``,
hooks and tensors saved for backward keep working. ZeRO-3 frees ``full`` between uses by
resizing its storage to 0 and gathers it back into the same storage (the FSDP trick), so
the views come back to life without being rebuilt.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from collectives import Communicator, Work

from ..materialize import become


class FlatUnit:
    def __init__(
        self,
        index: int,
        named: list[tuple[str, nn.Parameter]],
        comm: Communicator,
        sharded_params: bool,
        module: nn.Module | None = None,
        options: list[tuple] | None = None,
        frozen: bool = False,
    ):
        """``frozen``: parameters without gradients (a LoRA base): sharded and gathered like the others,
        but no optimizer pieces and no gradient shard. A frozen unit rides along with a trainable one as
        its ``companion`` (gathered and freed with it)."""
        self.index, self.module, self.frozen = index, module, frozen
        self.companion: FlatUnit | None = None
        options = options if options is not None else [()] * len(named)
        rank_of = {o: i for i, o in enumerate(_first_seen(options))}
        order = sorted(range(len(named)), key=lambda i: rank_of[options[i]])
        named, options = [named[i] for i in order], [options[i] for i in order]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.offsets, n = [], 0
        for p in self.params:
            self.offsets.append(n)
            n += p.numel()
        world, rank = comm.world_size, comm.rank
        self.numel = n
        self.padded = max(world, math.ceil(n / world) * world)
        self.shard = self.padded // world
        self.lo, self.hi = rank * self.shard, (rank + 1) * self.shard
        # One dtype per unit, the parameters' own (bf16 parameters stay bf16), on their device (a deferred
        # model's meta parameters: the communicator's device, where their values will arrive).
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) > 1:
            raise ValueError(
                f"ZeRO unit {index} ({self.names[0]}, ...) mixes parameter dtypes {sorted(map(str, dtypes))}"
                "\nHINT: give the model one parameter dtype (model.to(dtype)), or name units of one dtype "
                "each in parallel.zero.units"
            )
        self.dtype = dtypes.pop() if dtypes else torch.float32
        deferred = any(p.is_meta for p in self.params)  # values arrive later, into ``master``
        first = self.params[0].device if self.params else torch.device("cpu")
        self.device = torch.device(comm.backend.device or "cpu") if first.type == "meta" else first
        self.sharded_params = sharded_params
        # A deferred ZeRO-3 unit never fills ``full`` here: its pages are first touched by a gather.
        alloc = torch.empty if deferred and sharded_params else torch.zeros
        self.full = alloc(self.padded, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for p, o in zip(self.params, self.offsets):
                if p.is_meta:  # a real (empty) tensor of its own first: its version counter stays its own
                    shape, n = p.shape, p.numel()
                    become(p, torch.empty(0, dtype=p.dtype))
                    p.data = self.full[o : o + n].view(shape)
                    continue
                self.full[o : o + p.numel()].copy_(p.detach().reshape(-1))
                p.data = self.full[o : o + p.numel()].view(p.shape)
        if sharded_params:  # ZeRO-3: the master is the only persistent copy
            self.master = torch.zeros(self.shard) if deferred else self.full[self.lo : self.hi].clone()
            self._set_storage(0)
            self.gathered = False
        else:  # ZeRO-1/2: the master is this rank's slice of the full buffer itself
            self.master = self.full[self.lo : self.hi]
            self.gathered = True
        # (options, Parameter over master[a:b], a, b) per run of equal options this rank's slice meets
        self.pieces: list[tuple[tuple, nn.Parameter, int, int]] = []
        for opts, start, stop in [] if frozen else _runs(options, self.offsets, self.padded):
            a, b = max(start, self.lo) - self.lo, min(stop, self.hi) - self.lo
            if a < b:
                self.pieces.append((opts, nn.Parameter(self.master[a:b]), a, b))
        self.ag_work: Work | None = None
        # gradient side (ZeRO-2/3): the full gradient while backward fills it, the reduced shard after
        self.gfull: torch.Tensor | None = None
        # Written whole by the first reduce-scatter of a step (``fresh``) before anything reads it, so
        # its pages are not touched until then.
        self.gshard = torch.empty(0 if frozen else self.shard, dtype=self.dtype, device=self.device)
        self.rs_work: Work | None = None
        self.rs_out: torch.Tensor | None = None
        self.ready = 0

    def piece_at(self, a: int) -> tuple[nn.Parameter, int]:
        """The master piece holding master index ``a`` and where it starts."""
        for _, p, s, e in self.pieces:
            if s <= a < e:
                return p, s
        raise IndexError(a)

    def set_grad(self, grad: torch.Tensor) -> None:
        """Point every piece's ``.grad`` at its part of ``grad`` (this rank's gradient slice)."""
        for _, p, a, b in self.pieces:
            p.grad = grad[a:b]

    # -- parameters ------------------------------------------------------------------------
    def _set_storage(self, numel: int) -> None:
        self.full.untyped_storage().resize_(numel * self.full.element_size())

    def chunks(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [t[i * self.shard : (i + 1) * self.shard] for i in range(len(t) // self.shard)]

    def start_gather(self, comm: Communicator) -> None:
        """Allocate ``full`` and launch the allgather of every rank's master into it (async)."""
        if self.companion is not None:
            self.companion.start_gather(comm)
        if self.gathered or self.ag_work is not None:
            return
        self._set_storage(self.padded)
        with torch.autograd._unsafe_preserve_version_counter(self.full):
            self.ag_work = comm.allgather(self.chunks(self.full), self.master, async_op=True)

    def wait_gather(self) -> None:
        if self.companion is not None:
            self.companion.wait_gather()
        if self.ag_work is not None:
            with torch.autograd._unsafe_preserve_version_counter(self.full):
                self.ag_work.wait()
            self.ag_work = None
        self.gathered = True

    def free(self) -> None:
        """ZeRO-3: drop the gathered parameters (their views stay, with no storage)."""
        if self.sharded_params and (self.gathered or self.ag_work is not None):
            self.wait_gather()
            self._set_storage(0)
            self.gathered = False
        if self.companion is not None:  # after wait_gather, which waits for the companion's gather too
            self.companion.free()

    def gathered_bytes(self) -> int:
        own = self.full.untyped_storage().nbytes()
        return own + (self.companion.gathered_bytes() if self.companion is not None else 0)

    def refresh_full(self, comm: Communicator) -> Work | None:
        """ZeRO-1/2 after the optimizer step: every rank's updated slice into everybody's ``full``."""
        return comm.allgather(self.chunks(self.full), self.master.clone(), async_op=True)

    # -- gradients (ZeRO-2/3) ---------------------------------------------------------------
    def take_grad(self, i: int, grad: torch.Tensor) -> None:
        if self.gfull is None:
            self.gfull = torch.zeros(self.padded, dtype=self.dtype, device=self.device)
        o = self.offsets[i]
        self.gfull[o : o + grad.numel()].add_(grad.reshape(-1))

    def start_reduce_scatter(self, comm: Communicator, wire: torch.dtype | None, fresh: bool) -> None:
        from collectives import ReduceOp

        g = self.gfull if self.gfull is not None else torch.zeros(self.padded, dtype=self.dtype, device=self.device)
        if wire is not None:
            g = g.to(wire)
            self.rs_out = torch.empty(self.shard, dtype=wire, device=self.device)
        else:
            self.rs_out = self.gshard if fresh else torch.empty_like(self.gshard)
        self.rs_work = comm.reduce_scatter(self.rs_out, self.chunks(g), ReduceOp.SUM, async_op=True)
        self._rs_input = g  # kept alive until the op completes

    def wait_reduce_scatter(self, fresh: bool) -> None:
        if self.rs_work is None:
            return
        self.rs_work.wait()
        if self.rs_out is not self.gshard:
            if fresh:
                self.gshard.copy_(self.rs_out)
            else:
                self.gshard.add_(self.rs_out.to(self.gshard.dtype))
        self.rs_work = self.rs_out = self._rs_input = self.gfull = None
        self.ready = 0


def _first_seen(options: list[tuple]) -> list[tuple]:
    return list(dict.fromkeys(options))


def _runs(options: list[tuple], offsets: list[int], padded: int) -> list[tuple[tuple, int, int]]:
    """(options, start, stop) of each run of equal options over the flat layout; the last runs to ``padded``."""
    runs: list[list] = []
    for opts, o in zip(options, offsets):
        if not runs or runs[-1][0] != opts:
            runs.append([opts, o, o])
    for i, r in enumerate(runs):
        r[2] = runs[i + 1][1] if i + 1 < len(runs) else padded
    if not runs:
        runs = [[(), 0, padded]]
    return [tuple(r) for r in runs]

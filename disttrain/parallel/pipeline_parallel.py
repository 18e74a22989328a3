"""Pipeline parallelism: the GPT's blocks split into stages, micro-batches scheduled over them.

Stage 0 also holds the embeddings (tok_emb, pos_emb), the last stage ln_f and head. A stage
is the model itself with the other stages' modules removed, so parameter names stay those
of the single-process model (``blocks.3.mlp.fc.weight``). Activations go forward and their
gradients backward with send/recv on the pp group (sends are asynchronous and waited at the
end of the step, receives block), so any schedule whose per-link order agrees on both sides
cannot deadlock.

Schedules, for p stages and m micro-batches (each a list of ("F"|"B", micro-batch) per stage):

* GPipe: all m forwards, then all m backwards; holds m micro-batches' activations.
* 1F1B: ``p - 1 - stage`` warm-up forwards, then one forward / one backward alternately,
  then the remaining backwards; holds at most p micro-batches' activations.

Both idle each stage for (p-1) slots of an (m+p-1)-slot step: bubble (p-1)/(m+p-1).
Every stage calls :meth:`Pipeline.run` with the same micro-batches; the loss (sum over
micro-batches) is broadcast from the last stage so every rank reports it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn as nn

from collectives import Communicator

from ..mesh import MeshError

ACT_TAG, GRAD_TAG = 1, 2


# -- splitting --------------------------------------------------------------------------------
def balance_stages(costs: list[int], stages: int, first_extra: int = 0, last_extra: int = 0) -> list[list[int]]:
    """Contiguous split of layers with ``costs`` into ``stages`` (each >= 1 layer) that
    minimises the largest stage cost; the first/last stage also carry ``*_extra``."""
    n = len(costs)
    if stages > n:
        raise MeshError(
            f"parallel.mesh.pp={stages}: the model has {n} blocks, fewer than the stages"
            f"\nHINT: use pp <= {n} (each stage needs at least one block), or more layers"
        )
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: minimal max cost splitting the first i layers into k stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                c = prefix[i] - prefix[j] + (first_extra if k == 1 else 0) + (last_extra if k == stages else 0)
                v = max(best[k - 1][j], c)
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    bounds, i = [], n
    for k in range(stages, 0, -1):
        j = cut[k][i]
        bounds.append(list(range(j, i)))
        i = j
    return bounds[::-1]


def check_stages(plan: list[list[int]], n_layer: int, pp: int) -> list[list[int]]:
    """Validate a stage plan from the config: pp stages, contiguous, every block once."""
    flat = [b for s in plan for b in s]
    if len(plan) != pp or flat != list(range(n_layer)) or any(not s for s in plan):
        raise MeshError(
            f"parallel.pipeline.stages={plan}: expected {pp} non-empty stages covering blocks "
            f"0..{n_layer - 1} in order\nHINT: e.g. {balance_stages([1] * n_layer, pp)}"
        )
    return plan


def gpt_stage_plan(model: nn.Module, pp: int, plan: list[list[int]] | None) -> list[list[int]]:
    if not (hasattr(model, "blocks") and hasattr(model, "tok_emb") and hasattr(model, "head")):
        raise MeshError(
            f"pipeline parallel supports the GPT example's structure (tok_emb, pos_emb, blocks, ln_f, "
            f"head); got {type(model).__name__}\nHINT: use pp=1 for this model"
        )
    n = len(model.blocks)
    if plan is not None:
        return check_stages(plan, n, pp)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return balance_stages(
        [count(b) for b in model.blocks],
        pp,
        count(model.tok_emb) + count(model.pos_emb),
        count(model.ln_f) + count(model.head),
    )


def apply_pipeline_split(model: nn.Module, stages: list[list[int]], stage: int) -> nn.Module:
    """Keep only ``stage``'s modules of the GPT ``model`` (in place; names unchanged)."""
    blocks = model.blocks
    model.blocks = nn.ModuleDict({str(i): blocks[i] for i in stages[stage]})
    if stage != 0:
        model.tok_emb = model.pos_emb = None
    if stage != len(stages) - 1:
        model.ln_f = model.head = None
    model.pipeline_stage = (stage, len(stages))
    return model


def stage_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One stage of the GPT: ids -> residual (first), residual -> residual, residual -> logits (last)."""
    stage, n = model.pipeline_stage
    if stage == 0:
        pos = torch.arange(x.shape[1], device=x.device)
        x = model.drop(model.tok_emb(x) + model.pos_emb(pos))
    for block in model.blocks.values():
        x = block(x)
    if stage == n - 1:
        x = model.head(model.ln_f(x))
    return x


# -- schedules --------------------------------------------------------------------------------
def gpipe(stage: int, stages: int, m: int) -> list[tuple[str, int]]:
    return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]


def one_f_one_b(stage: int, stages: int, m: int) -> list[tuple[str, int]]:
    warm = min(stages - 1 - stage, m)
    acts = [("F", i) for i in range(warm)]
    for i in range(m - warm):
        acts += [("F", warm + i), ("B", i)]
    return acts + [("B", i) for i in range(m - warm, m)]


SCHEDULES: dict[str, Callable[[int, int, int], list[tuple[str, int]]]] = {"gpipe": gpipe, "1f1b": one_f_one_b}


class Pipeline:
    """Runs one stage of a pipeline. ``group`` is the pp Communicator (group rank = stage)."""

    def __init__(
        self,
        model: nn.Module,
        group: Communicator | None,
        schedule: str,
        d_model: int,
        forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] = stage_forward,
    ):
        if schedule not in SCHEDULES:
            raise MeshError(f"parallel.pipeline.schedule={schedule!r}; known: {', '.join(SCHEDULES)}")
        self.model, self.group, self.schedule, self.d_model, self.forward = model, group, schedule, d_model, forward
        self.stage, self.stages = model.pipeline_stage
        self.timing = {"busy_s": 0.0, "total_s": 0.0}  # of the last run(): compute time vs the whole step

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    def run(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], loss_fn) -> float:
        """Every stage, collectively: forward and backward every micro-batch by the schedule;
        gradients accumulate in the stage's parameters. Returns the summed loss on every stage."""
        start = time.perf_counter()
        busy = 0.0
        m = len(micro_batches)
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        pending = []
        loss_total = torch.zeros((), dtype=torch.float64)
        for kind, i in SCHEDULES[self.schedule](self.stage, self.stages, m):
            x, y = micro_batches[i]
            if kind == "F":
                if self.first:
                    inp = x
                else:
                    inp = torch.empty(x.shape[0], x.shape[1], self.d_model)
                    self.group.recv(inp, self.stage - 1, ACT_TAG)
                    inp.requires_grad_(True)
                t0 = time.perf_counter()
                out = self.forward(self.model, inp)
                if self.last:
                    out = loss_fn(out, y)
                    loss_total += float(out.detach())
                else:
                    out = out.float()
                busy += time.perf_counter() - t0
                if not self.last:
                    pending.append(self.group.send(out.detach().contiguous(), self.stage + 1, ACT_TAG, async_op=True))
                inputs[i], outputs[i] = inp, out
            else:
                inp, out = inputs.pop(i), outputs.pop(i)
                grad = None
                if not self.last:
                    grad = torch.empty_like(out)
                    self.group.recv(grad, self.stage + 1, GRAD_TAG)
                t0 = time.perf_counter()
                torch.autograd.backward(out, grad)
                busy += time.perf_counter() - t0
                if not self.first:
                    pending.append(self.group.send(inp.grad.contiguous(), self.stage - 1, GRAD_TAG, async_op=True))
        for w in pending:
            w.wait()
        self.group.broadcast(loss_total, src=self.stages - 1)
        self.timing = {"busy_s": busy, "total_s": time.perf_counter() - start}
        return float(loss_total)

    @torch.no_grad()
    def infer(self, x: torch.Tensor, vocab: int) -> torch.Tensor:
        """Every stage, collectively: the full model's output for ``x``, on every stage (fp32)."""
        inp = x
        if not self.first:
            inp = torch.empty(x.shape[0], x.shape[1], self.d_model)
            self.group.recv(inp, self.stage - 1, ACT_TAG)
        out = self.forward(self.model, inp).float().contiguous()
        if not self.last:
            self.group.send(out, self.stage + 1, ACT_TAG)
            out = torch.empty(x.shape[0], x.shape[1], vocab)
        self.group.broadcast(out, src=self.stages - 1)
        return out

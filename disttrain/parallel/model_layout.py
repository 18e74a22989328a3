"""The tp/pp set-up of :class:`~disttrain.parallel.model_parallel.ModelParallel`: tensor parallelism by
the plan (the model's own, ``parallel.tp.plan`` or ``parallel.tp.parallelize``; under peft adapters the
base's), then the pipeline split into this rank's stages and the groups of parameters tied across
stages. The strategy keeps what :func:`apply_model_parallel` returns and runs the steps on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn as nn

from collectives import Communicator

from ..config.parallel import ParallelConfig
from .adapters import adapted_base, plan_for_base
from .mesh import DeviceMesh, MeshError, MeshShape
from .pipeline.parallel import Pipeline
from .pipeline.split import build_stages
from .tensor.parallel import TPContext
from .tensor.plan import apply_tensor_parallel


@dataclasses.dataclass
class ModelLayout:
    """What one rank keeps of the model after tp and pp are applied."""

    model: nn.Module  # the user's model (changed in place), or what a parallelize target returned
    owned: dict[int, nn.Parameter]  # this rank's parameters (its stages' under pp), by id
    logical: dict[int, str]  # single-process names, by parameter id (pipeline stages rename modules)
    logical_buffers: dict[int, str]  # the same for buffers
    buffers: dict[str, torch.Tensor]  # this rank's buffers, by single-process name
    pipeline: Pipeline | None
    tied: list[tuple[str, Communicator]]  # (param name, group of the pp ranks holding it)
    skip_in_norm: set[str]  # tied parameters an earlier stage counts in the gradient norm


def legacy_split(stages: list[list[int]], pp: int, n_blocks: int) -> list[str]:
    """``parallel.pipeline.stages`` (blocks per stage of the built-in GPT) as split points."""
    flat = [b for s in stages for b in s]
    if len(stages) != pp or flat != list(range(n_blocks)) or any(not s for s in stages):
        raise MeshError(
            f"parallel.pipeline.stages={stages}: expected {pp} non-empty stages covering blocks "
            f"0..{n_blocks - 1} in order\nHINT: or name where stages begin: parallel.pipeline.split: ['blocks.2']"
        )
    return [f"blocks.{s[0]}" for s in stages[1:]]


def apply_model_parallel(
    model: nn.Module,
    cfg: ParallelConfig,
    comm: Communicator,
    mesh: DeviceMesh,
    shape: MeshShape,
    tp_ctx: TPContext,
    loss_parallel: bool | None,
    reset_rng: Callable[[], None],
) -> ModelLayout:
    """Every rank, collectively (the tied groups are new groups): apply tp, then split the stages.
    ``loss_parallel`` overrides ``cfg.tp.loss_parallel``; ``reset_rng`` is the pipeline's hook."""
    tp, pp = shape.tp, shape.pp
    base, prefix = adapted_base(model)  # under peft adapters: the plan and stages are the base's
    if tp > 1:
        lp = cfg.tp.loss_parallel if loss_parallel is None else loss_parallel
        out = apply_tensor_parallel(
            base, mesh, tp_ctx, plan_for_base(cfg.tp.plan, prefix), cfg.tp.parallelize, lp is not False
        )
        if out is not base and prefix:
            raise MeshError("parallel.tp.parallelize: a model under peft adapters must be changed in place")
        model, base = (model, base) if prefix else (out, out)
    logical = {id(p): n for n, p in model.named_parameters()}
    logical_buffers = {id(b): n for n, b in model.named_buffers()}
    if pp == 1:
        return ModelLayout(
            model, {id(p): p for p in model.parameters()}, logical, logical_buffers, dict(model.named_buffers()),
            None, [], set(),
        )  # fmt: skip
    pc = cfg.pipeline
    v = pc.virtual_stages
    split = pc.split
    if split is None and pc.stages is not None:
        split = legacy_split(pc.stages, pp, len(getattr(base, "blocks", [])))
    mine = [c * pp + mesh.index("pp") for c in range(v)]
    stage_params: dict[int, set[str]] = {}
    chunks = build_stages(base, pp * v, mine, split, pc.stage_forward, stage_params, logical)
    for c in chunks:  # a split target's own modules: named by stage
        for n, p in c.named_parameters():
            logical.setdefault(id(p), f"stage{c.index}.{n}")
    tied, skip = tied_groups(comm, mesh, shape, stage_params)
    pipeline = Pipeline(chunks, mesh.group("pp"), pc.schedule, pc.microbatches, mesh.group("tp"), reset_rng)
    owned = {id(p): p for c in chunks for p in c.parameters()}
    buffers = {logical_buffers[id(b)]: b for c in chunks for b in c.buffers() if id(b) in logical_buffers}
    return ModelLayout(model, owned, logical, logical_buffers, buffers, pipeline, tied, skip)


def tied_groups(
    comm: Communicator, mesh: DeviceMesh, shape: MeshShape, stage_params: dict[int, set[str]]
) -> tuple[list[tuple[str, Communicator]], set[str]]:
    """Parameters held by stages on several pp ranks (an LM head tied to the embedding): one group per
    (dp, tp) coordinate over those pp ranks, created on every rank in the same order. Returns this
    rank's (name, group) pairs and the names a stage other than the first holder skips in the norm."""
    pp = shape.pp
    holders: dict[str, list[int]] = {}
    for stage, names in sorted(stage_params.items()):
        for n in names:
            ranks = holders.setdefault(n, [])
            if stage % pp not in ranks:
                ranks.append(stage % pp)
    sets: dict[tuple[int, ...], list[str]] = {}
    for n, ranks in sorted(holders.items()):
        if len(ranks) > 1:
            sets.setdefault(tuple(sorted(ranks)), []).append(n)
    me = mesh.index("pp")
    tied: list[tuple[str, Communicator]] = []
    skip: set[str] = set()
    for ranks, names in sorted(sets.items()):
        for dp in range(shape.dp):
            for t in range(shape.tp):
                members = [shape.rank_of(r, dp, t) for r in ranks]
                g = comm.new_group(members)
                if comm.rank in members:
                    tied += [(n, g) for n in names]
        if me in ranks and me != ranks[0]:
            skip.update(names)
    return tied, skip

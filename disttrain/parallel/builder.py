"""``build_strategy``: the one call that turns a user's model into a training strategy.

Order (as torchtitan's ``parallelize``): model parallelism when the mesh asks for it; otherwise
synchronised BatchNorm (``parallel.sync_batchnorm``), activation checkpointing of the units
(``parallel.activation_checkpointing``, units from ``parallel.zero.units``), then data parallel or
ZeRO. The contracts live in :mod:`.strategy`; the implementations import only those.
"""

from __future__ import annotations

import logging

import torch.nn as nn

from collectives import Communicator

from ..config.parallel import ParallelConfig
from ..models.deferred import pending
from .materialize import maybe_materialize
from .strategy import OptimizerSpec, Strategy
from .sync_batchnorm import apply_sync_batchnorm
from .units import apply_activation_checkpointing, find_units

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")


def build_strategy(cfg: ParallelConfig, model: nn.Module, optim: OptimizerSpec, comm: Communicator) -> Strategy:
    """Every rank, collectively: wrap ``model`` with the strategy the ``parallel`` config section
    ``cfg`` names; the strategy builds its optimizer from ``optim``. Parameters and buffers start
    from rank 0's. A deferred model (built on meta, or with ``model.pretrained``) is given its values
    here, each rank only what it keeps (:mod:`.materialize`)."""
    device = str(comm.backend.device or "cpu")
    job = pending(model)
    keeps_whole = cfg.mesh.tp == 1 and cfg.mesh.pp == 1 and cfg.strategy != "zero3"
    if job is not None and (keeps_whole or job.recording is None):
        maybe_materialize(model, None, device)  # every rank keeps it all anyway
    strategy = _build(cfg, model, optim, comm)
    maybe_materialize(model, strategy, device)
    return strategy


def _build(cfg: ParallelConfig, model: nn.Module, optim: OptimizerSpec, comm: Communicator) -> Strategy:
    mesh = cfg.mesh
    if mesh.tp > 1 or mesh.pp > 1:  # model parallel (composes ddp/zero1 over dp)
        from .model_parallel import build_model_parallel

        flags = {"sync_batchnorm": cfg.sync_batchnorm, "activation_checkpointing": cfg.activation_checkpointing}
        unsupported = [k for k, on in flags.items() if on]
        if unsupported:
            raise ValueError(
                f"parallel.{unsupported[0]} is not supported with tensor/pipeline parallelism (mesh tp={mesh.tp}, "
                f"pp={mesh.pp})\nHINT: set parallel.{unsupported[0]}: false, or mesh tp: 1 and pp: 1"
            )

        return build_model_parallel(cfg, model, optim, comm)
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown parallel strategy {cfg.strategy!r}; known: {', '.join(STRATEGIES)}")
    if cfg.sync_batchnorm:
        group = comm.new_group(list(range(comm.world_size))) if comm.world_size > 1 else comm
        n = apply_sync_batchnorm(model, group)
        log.info("sync_batchnorm: %d BatchNorm layers synchronised over %d ranks", n, comm.world_size)
    units = find_units(model, cfg.zero.units) if cfg.strategy == "zero3" or cfg.activation_checkpointing else []
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(units)
    if cfg.strategy == "ddp":
        from .data_parallel import DataParallel

        return DataParallel(model, optim, comm, cfg)
    from .zero.strategy import Zero

    return Zero(int(cfg.strategy[-1]), model, optim, comm, cfg, [m for _, m in units])

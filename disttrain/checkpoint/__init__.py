"""Checkpoints: sharded, atomic, checksummed, pickle-free, asynchronous and reshardable.

    RUN_DIR/checkpoints/step_000100/{rank_00000.safetensors, ..., state.json, manifest.json}
    RUN_DIR/checkpoints/latest            -> "step_000100"

Modules: ``shardfile`` (safetensors I/O), ``manifest`` (the commit record and its
validation), ``checksum`` (xxh3), ``writer`` (rank files, commit, pruning), ``reader``
(verification, box serving), ``reshard`` (box overlap, layout checks), ``state`` (RNG,
step, config, the model record as JSON), ``cli`` (``disttrain ckpt``),
``checkpointer`` (the trainer callback: resume, periodic/async/preemption/final saves).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .checkpointer import Checkpointer
from .errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError, CheckpointMismatchError
from .reader import CheckpointReader, list_checkpoints, resolve

if TYPE_CHECKING:
    from ..config.checkpoint import CheckpointConfig

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "CheckpointReader",
    "Checkpointer",
    "list_checkpoints",
    "resolve",
    "maybe_build_checkpointer",
]


def maybe_build_checkpointer(cfg: CheckpointConfig, comm) -> Checkpointer | None:
    """The checkpoint callback for the ``checkpoint`` config section, or None when disabled."""
    return Checkpointer(cfg, comm) if cfg.enabled else None

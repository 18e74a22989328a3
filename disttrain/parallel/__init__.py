"""Parallelism strategies: how gradients, optimizer state and parameters are shared across ranks.

Contracts in :mod:`.strategy`; :func:`build_strategy` (in :mod:`.builder`) chooses an implementation.
"""

from .builder import build_strategy
from .strategy import OptimizerSpec, Shard, Strategy, schedules_micro_batches

__all__ = ["OptimizerSpec", "Shard", "Strategy", "build_strategy", "schedules_micro_batches"]

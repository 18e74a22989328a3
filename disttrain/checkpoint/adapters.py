"""The checkpoint's view of a strategy: its state shards (see disttrain/parallel/strategy.py).

Every strategy declares ``state_shards``/``load_state_shards`` in the ``Strategy`` contract;
these two calls are the only way the checkpointer touches training state.
"""

from __future__ import annotations

from ..parallel.strategy import Shard, ShardReader, Strategy


def state_shards(strategy: Strategy) -> list[Shard]:
    """This rank's shards of the model (parameters, buffers) and optimizer state. Local."""
    return strategy.state_shards()


def load_state_shards(strategy: Strategy, read: ShardReader) -> None:
    """Fill the strategy's state from ``read`` (a :class:`CheckpointReader`). Local."""
    strategy.load_state_shards(read)

"""Dropout under tensor parallelism: one RNG stream per kind of region (Megatron's tracker).

In a *replicated* region (the residual stream after a row layer's allreduce) every tp rank
holds the same activations and must drop the same elements: that is the ordinary torch
generator, seeded identically on every rank from the run seed and advanced identically by
tp peers. In a *sharded* region (between a column layer and its row layer: attention
probabilities of this rank's heads, this rank's MLP slice; or a sequence-parallel shard)
each tp rank holds different elements and must draw its own mask: a second stream, seeded
from (run seed, tp rank, pp stage). The tracker swaps the generator's state at region
boundaries (the parallel layers call it), so user code and ``nn.Dropout`` are untouched.

Its state goes into checkpoints (``state()``/``load()``) so a resumed run draws the same masks.
"""

from __future__ import annotations

import torch

_OFFSET = 2718  # Megatron's offset between the replicated and the tp-sharded seed


class RNGTracker:
    """Owned by the model-parallel strategy; called by the parallel layers of one rank (no communication)."""

    def __init__(self, seed: int, tp_rank: int, pp_rank: int = 0, device: str = "cpu"):
        self.device = device
        self.seed = seed + _OFFSET + 100 * pp_rank + tp_rank
        self._other = self._fresh(self.seed)
        self.sharded = False  # which stream the generator holds now

    def _get(self) -> torch.Tensor:
        if self.device.startswith("cuda"):
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def _fresh(self, seed: int) -> torch.Tensor:
        g = torch.Generator(device=self.device)  # leaves the default generator (and its seed) alone
        g.manual_seed(seed)
        return g.get_state()

    def _swap(self) -> None:
        now = self._get()
        self._set(self._other)
        self._other = now
        self.sharded = not self.sharded

    def enter_sharded(self) -> None:
        if not self.sharded:
            self._swap()

    def enter_replicated(self) -> None:
        if self.sharded:
            self._swap()

    def state(self) -> torch.Tensor:
        """The sharded stream's state (uint8), taken in the replicated region (between steps)."""
        self.enter_replicated()
        return self._other.clone()

    def load(self, state: torch.Tensor) -> None:
        self.enter_replicated()
        self._other = state.to(torch.uint8).clone()

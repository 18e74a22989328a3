"""Mixed precision: autocast dtypes and fp16 loss scaling. Master weights always stay fp32.

bf16 needs no scaling (same exponent range as fp32): the trainer just autocasts. fp16 does:
:class:`LossScaler` multiplies the loss before backward, divides the reduced gradients before
clipping, and skips the optimizer step (halving the scale) when any rank's gradients hold an
inf/NaN; the scale doubles after ``growth_interval`` clean steps (like torch.cuda.amp.GradScaler,
but over a strategy's gradient tensors, so it works with sharded ZeRO gradients too).

Trainer call order, every rank: ``scaler.scale(loss).backward()`` per micro-batch,
``strategy.finish_gradients()``, ``ok = scaler.unscale_(strategy.grad_tensors(), comm)``
(collective: one allreduce), clip, ``optimizer_step()`` only if ``ok``, ``scaler.update(ok)``.
"""

from __future__ import annotations

import contextlib

import torch

from collectives import Communicator, ReduceOp

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: str):
    """The autocast context for ``precision`` (fp32: none) on ``device`` (cpu or cuda)."""
    dtype = AUTOCAST.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


class LossScaler:
    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        self.scale_value, self.growth, self.backoff, self.interval = (
            init_scale,
            growth_factor,
            backoff_factor,
            growth_interval,
        )
        self._clean = 0
        self.skipped = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value

    @torch.no_grad()
    def unscale_(self, grads: list[torch.Tensor], comm: Communicator | None = None) -> bool:
        """Divide ``grads`` by the scale; True if every rank's are finite. Collective with ``comm``."""
        bad = torch.zeros(1, dtype=torch.float32)
        for g in grads:
            if g.numel() and not bool(torch.isfinite(g).all()):
                bad.fill_(1.0)
                break
        if comm is not None and comm.world_size > 1:
            comm.allreduce(bad, ReduceOp.MAX)
        if float(bad):
            return False
        inv = 1.0 / self.scale_value
        for g in grads:
            g.mul_(inv)
        return True

    def update(self, ok: bool) -> None:
        if not ok:
            self.scale_value *= self.backoff
            self._clean = 0
            self.skipped += 1
            return
        self._clean += 1
        if self._clean >= self.interval:
            self.scale_value *= self.growth
            self._clean = 0


def maybe_loss_scaler(precision: str) -> LossScaler | None:
    """A loss scaler for fp16, None otherwise (bf16 and fp32 need none)."""
    return LossScaler() if precision == "fp16" else None

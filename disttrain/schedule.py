"""Learning-rate schedules: linear warmup, then constant or cosine decay."""

from __future__ import annotations

import math


def lr_at(
    step: int, peak: float, total_steps: int, kind: str = "cosine", warmup_steps: int = 0, min_lr_ratio: float = 0.1
) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if kind == "constant":
        return peak
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = peak * min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

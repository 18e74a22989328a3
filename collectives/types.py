"""Small value types shared by every backend: reduce ops and the async work handle."""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

import torch


class ReduceOp(enum.StrEnum):
    """Reduction applied by allreduce and reduce_scatter."""

    SUM = "sum"
    AVG = "avg"
    MIN = "min"
    MAX = "max"
    PROD = "prod"


SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.float16,
    torch.int32,
    torch.int64,
)


@runtime_checkable
class Work(Protocol):
    """Handle of an asynchronous collective.

    ``wait`` blocks until the op is complete (or raises the op's error); it may be
    called more than once. ``is_completed`` never blocks.
    """

    def wait(self, timeout: float | None = None) -> None: ...

    def is_completed(self) -> bool: ...


class CompletedWork:
    """A handle for an op that already finished synchronously."""

    def wait(self, timeout: float | None = None) -> None:
        return None

    def is_completed(self) -> bool:
        return True

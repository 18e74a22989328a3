"""The ``checkpoint:`` section: when to save, what to keep, how to load."""

from __future__ import annotations

from pydantic import Field

from .section import Section


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="Steps between checkpoints (0: only at the end).")
    keep: int = Field(2, ge=1, description="Checkpoints kept in the run directory.")
    enabled: bool = Field(True, description="Write checkpoints and resume from the latest one after a restart.")
    async_save: bool = Field(
        True,
        description="Periodic saves copy state to host memory and write it in the "
        "background while training continues (stop-request and final saves are synchronous).",
    )
    verify_on_load: bool = Field(True, description="Check every file's xxh3 checksum before any tensor is used.")
    fallback: bool = Field(
        True,
        description="If the newest checkpoint fails verification, load the newest one "
        "that verifies (with a warning) instead of stopping.",
    )

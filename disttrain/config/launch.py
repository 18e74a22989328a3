"""The ``launch:`` section: processes and transport. ``backend`` is checked against the collectives
registry when the config loads, so a typo stops ``disttrain run`` before any worker starts."""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import Field, field_validator

from collectives import registry

from .section import Section


class LaunchConfig(Section):
    nproc: int = Field(2, ge=1, description="Worker processes per node.")
    backend: str = Field(
        "torch",
        description="Collectives backend, a name in collectives' registry: torch (gloo/nccl), shm, mpi, nccl "
        "or horovod (and any name registered with collectives.registry.register before the config loads).",
    )
    check_collectives: bool = Field(True, description="Compare op/shape/dtype across ranks before each collective.")
    timeout: float = Field(300.0, gt=0, description="Seconds a collective may wait for its peers.")
    max_restarts: int = Field(0, ge=0, description="Restart the worker group this many times after a failure.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Device of every rank: cuda is LOCAL_RANK's GPU; auto is cuda when this host has a GPU, else cpu.",
    )
    hang_timeout: float = Field(
        120.0,
        ge=0,
        description="`disttrain run`: seconds without a finished collective on any rank before the launcher "
        "collects every rank's last collectives and Python stacks, prints which rank is behind and where, "
        "and ends the job (0: off). `disttrain trace RUN_DIR` prints that report again.",
    )
    hang_stop: bool = Field(True, description="End the job after the hang report (false: print it and keep waiting).")

    @field_validator("backend")
    @classmethod
    def _registered(cls, name: str) -> str:
        known = registry.known()
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"unknown collectives backend {name!r}; known backends: {', '.join(known)}\n"
                f"HINT: {hint}a backend of your own needs collectives.registry.register(name, 'module:Class')"
            )
        return name

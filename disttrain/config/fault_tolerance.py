"""The ``fault_tolerance:`` section: in-memory peer replicas of every rank's state (issue #25)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .section import Section


class FaultToleranceConfig(Section):
    every: int = Field(
        0,
        ge=0,
        description="Steps between in-memory copies of every rank's state to the agents of other hosts "
        "(0: off). After a host is lost the survivors resume from the newest complete copy instead of the "
        "disk checkpoint, losing at most the steps since it. Needs a multi-node `disttrain launch`.",
    )
    replicas: int = Field(
        1,
        ge=1,
        description="Other hosts that hold a copy of each host's state (besides its own agent): losing any "
        "`replicas` hosts leaves a copy of everything.",
    )
    recover: Literal["restart", "in_place"] = Field(
        "restart",
        description="How the survivors of a lost host go on. `restart`: their agents start new workers at the "
        "new world size. `in_place`: the running workers abort the step in flight, rebuild their communicators "
        "and strategy at the new world size and restore from the copies in memory, without a new process "
        "(no process start or imports). On a backend that cannot abort a collective (mpi) it falls back to "
        "`restart` with a log line saying why; anything that fails in place falls back to `restart` too.",
    )

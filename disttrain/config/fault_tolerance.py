"""The ``fault_tolerance:`` section: in-memory peer replicas of every rank's state (issue #25)."""

from __future__ import annotations

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

"""The ``fault_tolerance:`` section: in-memory peer replicas of every rank's state (issue #25)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .section import Section


class FaultToleranceConfig(Section):
    every: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        0,
        description="Steps between in-memory copies of every rank's state to the agents of other hosts "
        "(0: off). After a host is lost the survivors resume from the newest complete copy instead of the "
        "disk checkpoint, losing at most the steps since it. `auto`: measure a copy's cost against the "
        "step time over the first steps and copy every k steps, the smallest k whose cost stays under "
        "`target_overhead` (logged with the steps at risk). Needs a multi-node `disttrain launch`.",
    )
    target_overhead: float = Field(
        0.03,
        gt=0,
        description="With `every: auto`: the share of step time the copies may cost (0.03: steps at most 3% slower).",
    )
    replicas: int = Field(
        1,
        ge=1,
        description="Other hosts that hold a copy of each host's state (besides its own agent): losing any "
        "`replicas` hosts leaves a copy of everything.",
    )

"""The ``fault_tolerance:`` section: in-memory peer replicas of every rank's state, and the layouts a
job may fall back to when a lost host leaves a world that ``parallel.mesh`` no longer fits (issue #25)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .section import Section


class FallbackLayout(Section):
    """One layout the job may take when ``parallel.mesh`` does not fit the world (dp fills the rest)."""

    tp: int = Field(1, ge=1, description="Tensor-parallel degree of this layout.")
    pp: int = Field(1, ge=1, description="Pipeline-parallel degree of this layout.")


class FaultToleranceConfig(Section):
    every: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        0,
        description="Steps between in-memory copies of every rank's state to the agents of other hosts "
        "(0: off). After a host is lost the survivors resume from the newest complete copy instead of the "
        "disk checkpoint, losing at most the steps since it. `auto`: measure a copy's cost against the "
        "step time over the first steps and copy every k steps, the smallest k whose cost stays under "
        "`target_overhead`, rounded up to a divisor of `checkpoint.every` (logged with the steps at risk). "
        "Needs a multi-node `disttrain launch`.",
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
    recover: Literal["restart", "in_place"] = Field(
        "restart",
        description="How the survivors of a lost host go on. `restart`: their agents start new workers at the "
        "new world size. `in_place`: the running workers abort the step in flight, rebuild their communicators "
        "and strategy at the new world size and restore from the copies in memory, without a new process "
        "(no process start or imports). On a backend that cannot abort a collective (mpi) it falls back to "
        "`restart` with a log line saying why; anything that fails in place falls back to `restart` too.",
    )
    fallback: list[FallbackLayout] = Field(
        [],
        description="Layouts tried in order, dp filling the rest, when parallel.mesh does not fit the world "
        "size (a lost host left too few ranks for tp x pp, or a product that does not divide them), e.g. "
        "[{tp: 1, pp: 1}]: the state is resharded to the first that fits. Empty: such a world stops with a "
        "message naming the layout and the world size.",
    )

    @model_validator(mode="after")
    def _distinct_fallbacks(self) -> FaultToleranceConfig:
        seen: set[tuple[int, int]] = set()
        for i, f in enumerate(self.fallback):
            if (f.tp, f.pp) in seen:
                raise ValueError(f"fallback[{i}] (tp={f.tp}, pp={f.pp}) repeats an earlier entry")
            seen.add((f.tp, f.pp))
        return self

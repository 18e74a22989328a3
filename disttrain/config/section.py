"""What every config section shares: the pydantic base (unknown keys refused, assignments checked)
and the spelling of an import target. A leaf: section modules import this and nothing else of ours,
so any component can import its own section without an import cycle."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


TARGET_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"
TargetStr = Annotated[str, Field(pattern=TARGET_PATTERN)]

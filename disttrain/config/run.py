"""The ``run:`` section: naming, output and seed."""

from __future__ import annotations

from pydantic import Field

from .section import Section


class RunConfig(Section):
    name: str = Field("experiment", description="Name of the experiment (job name, log prefix).")
    dir: str = Field("runs/experiment", description="Run directory: config, metrics, summary, logs, checkpoints.")
    seed: int = Field(0, description="Seed for model init, data order and dropout; identical on every rank.")
    import_path: list[str] = Field(
        [],
        description="Directories searched first for import targets (model.target, data.target, loss.target); "
        "load() appends the config file's directory and the current directory, so a saved config still finds them.",
    )

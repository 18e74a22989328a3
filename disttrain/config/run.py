"""The ``run:`` section: naming, output and seed."""

from __future__ import annotations

from pydantic import Field

from .section import Section


class RunConfig(Section):
    name: str = Field("experiment", description="Name of the experiment (job name, log prefix).")
    dir: str = Field("runs/experiment", description="Run directory: config, metrics, summary, logs, checkpoints.")
    shared_group: bool = Field(
        False,
        description="Share the run directory with its group: accept one (or a parent) the group can write, and "
        "create directories 0750 and files 0640 so the group reads weights and logs. Off: directories 0700, files "
        "0600, and a run directory anyone but you could change is refused (see SECURITY.md).",
    )
    seed: int = Field(0, description="Seed for model init, data order and dropout; identical on every rank.")
    import_path: list[str] = Field(
        [],
        description="Directories searched first for import targets (model.target, data.target, loss.target); "
        "load() appends the config file's directory and the current directory, so a saved config still finds them.",
    )

"""The ``slurm:`` section: sbatch options, requeue and preemption."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .section import Section


class SlurmConfig(Section):
    job_name: str | None = Field(None, description="sbatch --job-name (default: run.name).")
    output: str | None = Field(
        None, description="sbatch --output pattern (default: RUN_DIR/slurm/%x-%j.out, %x-%A_%a.out for arrays)."
    )
    partition: str | None = Field(None, description="sbatch --partition (default: the cluster's default).")
    time: str | int | None = Field(None, description="sbatch --time limit, e.g. 04:00:00 or 30 (minutes).")
    nodes: int | None = Field(None, ge=1, description="Nodes; when set, a job started by srun must match it.")
    ntasks_per_node: int | None = Field(
        None,
        ge=1,
        description="Workers per node (default: launch.nproc); when set, a job started by srun must match it.",
    )
    gpus_per_node: int | None = Field(None, ge=0, description="sbatch --gpus-per-node.")
    cpus_per_task: int | None = Field(None, ge=1, description="sbatch --cpus-per-task.")
    array: str | int | None = Field(None, description="Job array spec, e.g. 0-3 or 0-7%2 (uses the array template).")
    mode: Literal["srun", "agent"] = Field(
        "srun",
        description="srun: one task per worker; agent: one launcher agent per node that starts the node's workers.",
    )
    template: str | None = Field(
        None,
        description="Path of a custom sbatch template (default: the packaged disttrain/slurm/templates/<kind>.sbatch).",
    )
    extra_sbatch: list[str] = Field([], description="Extra #SBATCH options, e.g. ['--account=abc', '--qos=high'].")
    setup: list[str] = Field([], description="Shell lines run before srun (module load, venv activation).")
    requeue: bool = Field(True, description="Requeue the job after a preemption checkpoint (sbatch --requeue).")
    max_requeues: int = Field(20, ge=0, description="Stop requeueing once SLURM_RESTART_COUNT reaches this.")
    signal: str = Field("USR1", description="Signal SLURM sends before the time limit (SIGTERM is always handled).")
    signal_seconds: int = Field(90, ge=1, description="Seconds before the time limit the signal is sent.")
    preemption: Literal["auto"] | bool = Field(
        "auto",
        description="Catch the signals, save and stop at an agreed "
        "step: true, false, or auto (only inside a SLURM job).",
    )
    check_every: int = Field(1, ge=1, description="Steps between the ranks' stop-flag agreements (one tiny allreduce).")
    worker_module: str = Field(
        "disttrain.worker",
        description="Module srun starts on every task (python -m); a custom entry must call disttrain.worker.main "
        "and end with disttrain.teardown.leave(code), as disttrain.worker does.",
    )

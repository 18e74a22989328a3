"""The whole experiment: one field per section, each section's model in the module named by it."""

from __future__ import annotations

from pydantic import Field, model_validator

from .checkpoint import CheckpointConfig
from .data import DataConfig, DigitsData, TargetData
from .fault_tolerance import FaultToleranceConfig
from .launch import LaunchConfig
from .log import CallbackConfig, LogConfig, ProfileConfig
from .loss import LossConfig
from .model import MLPConfig, ModelConfig, TargetModel
from .optim import OptimConfig
from .parallel import ParallelConfig
from .run import RunConfig
from .schedule import ScheduleConfig
from .section import Section
from .slurm import SlurmConfig
from .train import TrainConfig


class ExperimentConfig(Section):
    run: RunConfig = Field(default_factory=RunConfig, description="Naming, output and seed.")
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="Processes and transport.")
    model: ModelConfig = Field(default_factory=MLPConfig, description="The network.")
    data: DataConfig = Field(default_factory=DigitsData, description="The dataset.")
    loss: LossConfig = Field(default_factory=LossConfig, description="The step function: forward and loss.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Learning-rate schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Loop length, batch and precision.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Parallelism strategy.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    fault_tolerance: FaultToleranceConfig = Field(
        default_factory=FaultToleranceConfig, description="In-memory peer replicas for losing a host."
    )
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="SLURM submission and preemption.")
    log: LogConfig = Field(default_factory=LogConfig, description="Trackers and the metrics line's throughput.")
    profile: ProfileConfig = Field(
        default_factory=ProfileConfig, description="torch.profiler traces of some steps: RUN_DIR/profiles."
    )
    callbacks: list[CallbackConfig] = Field(
        [], description="Trainer callbacks after the built-in ones, in order: [{target, kwargs}]."
    )

    @model_validator(mode="after")
    def _builtin_model_needs_builtin_data(self) -> ExperimentConfig:
        if not isinstance(self.model, TargetModel) and isinstance(self.data, TargetData):
            raise ValueError(
                f"model.kind {self.model.kind!r} is sized from a built-in dataset (digits or shakespeare), "
                "not from data.target\nHINT: set model.target to your own model factory"
            )
        return self

    @model_validator(mode="after")
    def _fallbacks_fit_the_parallel_flags(self) -> ExperimentConfig:
        par = self.parallel
        on = {"sync_batchnorm": par.sync_batchnorm, "activation_checkpointing": par.activation_checkpointing}
        flags = [k for k, v in on.items() if v]
        for i, f in enumerate(self.fault_tolerance.fallback):
            if (f.tp > 1 or f.pp > 1) and flags:
                raise ValueError(
                    f"fault_tolerance.fallback[{i}] (tp={f.tp}, pp={f.pp}) is model parallel, which "
                    f"parallel.{flags[0]} does not support\nHINT: fall back to tp: 1, pp: 1, or set "
                    f"parallel.{flags[0]}: false"
                )
        return self

    def targets(self) -> dict[str, str]:
        """Every import target of this config, by key path."""
        found = {"loss.target": self.loss.target}
        from ..observe.callbacks import BUILTIN

        found.update(
            {f"callbacks.{i}.target": c.target for i, c in enumerate(self.callbacks) if c.target not in BUILTIN}
        )
        if isinstance(self.model, TargetModel):
            found["model.target"] = self.model.target
        if isinstance(self.data, TargetData):
            found.update({"data.target": self.data.target, "data.collate": self.data.collate})
        return {k: v for k, v in sorted(found.items()) if v}

"""Typed experiment config: pydantic models that mirror the YAML, one module per section.

Every model forbids unknown keys and documents each field. A section's model lives in the
module named by the section (``launch.py`` holds ``LaunchConfig``), so a component imports
its own section (``from disttrain.config.parallel import ParallelConfig``) without pulling in
the others; ``experiment.py`` puts them together and ``loader.py`` reads YAML files, keyword
settings and ``key.path=value`` overrides into one, or raises :class:`ConfigError` whose lines
read ``SOURCE: key.path: got X, expected Y``.
"""

from ..errors import ConfigError
from .checkpoint import CheckpointConfig
from .data import DataConfig, DigitsData, Loading, ShakespeareData, TargetData
from .experiment import ExperimentConfig
from .fault_tolerance import FaultToleranceConfig
from .launch import LaunchConfig
from .loader import dump, from_settings, load, save
from .log import CallbackConfig, LogConfig, ProfileConfig
from .loss import LossConfig
from .model import GPTConfig, MLPConfig, ModelConfig, TargetModel
from .optim import OptimConfig
from .parallel import (
    MeshConfig,
    ParallelConfig,
    PipelineConfig,
    TensorParallelConfig,
    ZeroConfig,
)
from .run import RunConfig
from .schedule import ScheduleConfig
from .section import TARGET_PATTERN, Section, TargetStr
from .slurm import SlurmConfig
from .train import TrainConfig

__all__ = [
    "TARGET_PATTERN",
    "CallbackConfig",
    "CheckpointConfig",
    "FaultToleranceConfig",
    "ConfigError",
    "DataConfig",
    "DigitsData",
    "ExperimentConfig",
    "GPTConfig",
    "LaunchConfig",
    "Loading",
    "LogConfig",
    "LossConfig",
    "MLPConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "PipelineConfig",
    "ProfileConfig",
    "RunConfig",
    "ScheduleConfig",
    "Section",
    "ShakespeareData",
    "SlurmConfig",
    "TargetData",
    "TargetModel",
    "TargetStr",
    "TensorParallelConfig",
    "TrainConfig",
    "ZeroConfig",
    "dump",
    "from_settings",
    "load",
    "save",
]

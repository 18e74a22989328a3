"""Datasets: the built-in kinds that ship offline, the user's own through ``data.target`` (map-style or
streams), and the global-batch sampler and loader that split each step's batch across ranks and
micro-batches."""

from .builder import TASKS, build_target_data, build_task
from .dataset import Data, TensorPairs, as_data
from .loader import StepLoader
from .sampler import GlobalBatchSampler
from .stream import StreamSampler, build_sampler, is_stream
from .task import Task

__all__ = [
    "TASKS",
    "Data",
    "GlobalBatchSampler",
    "StepLoader",
    "StreamSampler",
    "Task",
    "TensorPairs",
    "as_data",
    "build_sampler",
    "build_target_data",
    "is_stream",
    "build_task",
]

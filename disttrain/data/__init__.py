"""Datasets that ship offline, and the sampler that splits each global batch across ranks."""

from .sampler import GlobalBatchSampler
from .task import Task, build_task

__all__ = ["GlobalBatchSampler", "Task", "build_task"]

"""Seeing what a job does: callbacks, metrics reduced over ranks, trackers, throughput, profiles.

Modules: ``callbacks`` (the hook protocol, early stopping, best checkpoint), ``metrics`` (the
user's metrics reduced over ranks and the log window), ``progress`` (the progress line),
``trackers/`` (TensorBoard, W&B, MLflow, CSV through their own libraries, imported when named),
``throughput`` (step time split, speed, memory, FLOPs and MFU).
"""

from .callbacks import BestCheckpoint, Callback, EarlyStopping

__all__ = ["BestCheckpoint", "Callback", "EarlyStopping"]

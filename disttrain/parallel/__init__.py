"""Parallelism strategies: how gradients, optimizer state and parameters are shared across ranks."""

from .strategy import Strategy, build_strategy

__all__ = ["Strategy", "build_strategy"]

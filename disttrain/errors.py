"""The error family of the disttrain package."""

from __future__ import annotations


class DisttrainError(RuntimeError):
    """Base class of every error raised by ``disttrain``."""


class ConfigError(DisttrainError):
    """A config file or override that does not validate. ``str()`` is the user-facing report."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines

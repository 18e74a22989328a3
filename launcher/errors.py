"""The error family of the launcher package."""

from __future__ import annotations


class LauncherError(RuntimeError):
    """Base class of every error raised by ``launcher``; messages name host and rank, then a HINT."""


class LaunchConfigError(LauncherError):
    """Flags or a hostfile that cannot describe a job (bad counts, unknown host, port in use)."""

"""The error of the SLURM wing: SLURM's variables, a job secret or a requeue that cannot be used."""

from __future__ import annotations

from ..errors import LauncherError


class SlurmEnvError(LauncherError):
    """SLURM's variables are missing, malformed or contradict each other (or the config), the job
    secret cannot be trusted, or the job cannot be requeued. The message names the variable or
    file, the rank and job where known, then a HINT."""

"""launcher: start worker processes with torchrun's environment contract.

Never imports ``disttrain`` or ``collectives`` (and never torch: start-up must be cheap).
"""
from .agent import LocalAgent, NodeSpec, RunResult
from .errors import LauncherError, LaunchConfigError
from .hostfile import HostSlots
from .job import JobSpec, run_job
from .ssh import SshOptions
from .report import Failure, format_report
from .worker import Worker, WorkerSpec, WorkerState

__all__ = ["Failure", "HostSlots", "JobSpec", "SshOptions", "run_job", "LaunchConfigError", "LauncherError", "LocalAgent", "NodeSpec", "RunResult", "Worker",
           "WorkerSpec", "WorkerState", "format_report"]

"""launcher: start worker processes with torchrun's environment contract, on one host or many.

Never imports ``disttrain`` or ``collectives`` (and never torch: start-up must be cheap).
Names load lazily, so a worker's ``python -m launcher.bootstrap`` imports almost nothing.

    from launcher import JobSpec, WorkerSpec, run_job, HostSlots
    result = run_job(WorkerSpec(["train.py"], nproc=2), JobSpec(hosts=[HostSlots("node1", 2), HostSlots("node2", 2)]))
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LocalAgent": "agent",
    "NodeSpec": "agent",
    "RunResult": "agent",
    "LauncherError": "errors",
    "LaunchConfigError": "errors",
    "HostSlots": "hostfile",
    "JobSpec": "job",
    "run_job": "job",
    "SshOptions": "ssh",
    "Failure": "report",
    "format_report": "report",
    "Worker": "worker",
    "WorkerSpec": "worker",
    "WorkerState": "worker",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'launcher' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)

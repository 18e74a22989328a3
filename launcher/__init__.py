"""launcher: start worker processes with torchrun's environment contract, on one host or many.

Never imports ``disttrain`` or ``collectives`` (and never torch: start-up must be cheap).
Names load lazily, so a worker's ``python -m launcher.bootstrap`` imports almost nothing.

    from launcher import JobSpec, WorkerSpec, run_job, HostSlots
    result = run_job(WorkerSpec(["train.py"], nproc=2), JobSpec(hosts=[HostSlots("node1", 2), HostSlots("node2", 2)]))
"""

from __future__ import annotations

import importlib

# name -> module (the attribute has the same name) or "module:attribute". disttrain uses these names only.
_EXPORTS = {
    "LocalAgent": "agent",
    "NodeSpec": "node",
    "RunResult": "node",
    "LauncherError": "errors",
    "LaunchConfigError": "errors",
    "HostSlots": "hostfile",
    "JobSpec": "job",
    "run_job": "job",
    "SshOptions": "ssh",
    "Failure": "report",
    "format_report": "report",
    "format_hang_report": "hang:format_report",
    "read_hang_dumps": "hang:read_dumps",
    "Worker": "worker",
    "WorkerSpec": "worker",
    "WorkerState": "worker",
    "free_port": "environment",
    "launch": "cli",
    "launch_main": "cli:main",
    "AuthStore": "torch_store",
    "connect_replica": "replica_store",
    "replica_tag_key": "replica_store",
    "shm_dir_from_env": "replica_store",
    "replica_addresses_from_env": "replica_store",
    # recovery in place: the worker's side (launcher.inplace)
    "RoundWatch": "inplace",
    "declare_in_place": "inplace:declare",
    "wait_next_world": "inplace:wait_next",
    # SLURM: the one reader of SLURM's variables (launcher.slurm.place) and what workers call
    "SlurmEnvError": "slurm.errors",
    "SlurmPlace": "slurm.place",
    "in_slurm": "slurm.place",
    "array_task_id": "slurm.place",
    "restart_count": "slurm.place",
    "read_slurm_env": "slurm.place",
    "setup_slurm_worker": "slurm.worker:setup_worker",
    "requeue": "slurm.requeue",
    "requeue_id": "slurm.requeue",
    "catch_signals_early": "slurm.signals",
    "parse_signal": "slurm.signals",
    "release_early_signals": "slurm.signals",
    "take_early_signal": "slurm.signals",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'launcher' has no attribute {name!r}")
    module, _, attr = _EXPORTS[name].partition(":")
    return getattr(importlib.import_module(f".{module}", __name__), attr or name)

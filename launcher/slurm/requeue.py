"""Requeue a preempted job: ``scontrol requeue`` (an array task alone), else resubmit the script.

Called by rank 0 once every rank has saved (``disttrain.slurm.preemption``). The requeued job
resumes from that checkpoint; SLURM counts the attempts in ``SLURM_RESTART_COUNT``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping

from .errors import SlurmEnvError


def requeue_id(env: Mapping[str, str] | None = None) -> str:
    """What to requeue: ``ARRAYJOB_TASK`` for an array task (never the whole array), else the job id."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    job = env.get("SLURM_JOB_ID")
    if not job:
        raise SlurmEnvError("cannot requeue: SLURM_JOB_ID is not set (not inside a SLURM job)")
    return job


_CONTRACT_PREFIXES = ("DISTTRAIN_", "TORCHELASTIC_", "SLURM_")
_CONTRACT_NAMES = {
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
}


def _clean_env() -> dict[str, str]:
    """This worker's environment without its place in the old job (sbatch exports the environment:
    a resubmitted job must not inherit the old rank, store address or secret). SLURM_CONF stays."""
    return {
        k: v
        for k, v in os.environ.items()
        if k == "SLURM_CONF" or not (k in _CONTRACT_NAMES or k.startswith(_CONTRACT_PREFIXES))
    }


def _requeued(job: str, timeout: float) -> bool:
    """Whether SLURM shows ``job`` requeued (pending again, or a restart counted since we started)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=timeout
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    state = re.search(r"\bJobState=(\S+)", out)
    restarts = re.search(r"\bRestarts=(\d+)", out)
    before = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    return bool(
        (state and state.group(1) in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"))
        or (restarts and int(restarts.group(1)) > before)
    )


def requeue(job: str, array_task_id: str | None = None, script: str | None = None, timeout: float = 60.0) -> str:
    """Put ``job`` (a job id, or ``ARRAYJOB_TASK``) back in the queue; returns what was done.

    Called by rank 0 once every rank has saved. ``scontrol requeue`` first; when scontrol is
    missing or refuses, resubmit ``script`` with sbatch (only the array task, for arrays).
    Raises :class:`SlurmEnvError` when neither works.
    """
    tried = []
    if shutil.which("scontrol"):
        try:
            proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=timeout)
            if proc.returncode == 0:
                return f"requeued job {job} (scontrol requeue)"
            # The requeue cancels this very job step, so scontrol (a child of a worker in it) can be
            # killed before it answers although the requeue took effect: ask SLURM before resubmitting,
            # or the job would run twice.
            if _requeued(job, timeout):
                return f"requeued job {job} (scontrol requeue; confirmed by scontrol show job)"
            tried.append(f"scontrol requeue {job}: {(proc.stderr or proc.stdout).strip() or f'exit {proc.returncode}'}")
        except subprocess.TimeoutExpired:
            tried.append(f"scontrol requeue {job}: no answer in {timeout:g}s")
    else:
        tried.append("scontrol: not installed")
    if script and shutil.which("sbatch"):
        cmd = ["sbatch", "--parsable"] + ([f"--array={array_task_id}"] if array_task_id else []) + [script]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_clean_env())
            if proc.returncode == 0:
                return f"resubmitted {script} as job {proc.stdout.strip()} (sbatch)"
            tried.append(f"sbatch {script}: {(proc.stderr or proc.stdout).strip()}")
        except subprocess.TimeoutExpired:
            tried.append(f"sbatch {script}: no answer in {timeout:g}s")
    elif not script:
        tried.append("no batch script to resubmit (DISTTRAIN_SLURM_SCRIPT unset)")
    else:
        tried.append("sbatch: not installed")
    raise SlurmEnvError(
        f"could not requeue job {job}: " + "; ".join(tried) + ". HINT: the checkpoint is saved; "
        "resubmit the job by hand (it resumes), and submit with --requeue"
    )

"""WorkerSpec (what to run) apart from Worker (a running process), as torchelastic does.

State transitions of a :class:`Worker`:
``INIT -> RUNNING -> (SUCCEEDED | FAILED | STOPPED)``; ``STOPPED`` means we killed it
because a peer failed or the user interrupted.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import signal
import subprocess
import sys
import time

from .logs import StreamPump, console_for, rank_log_paths
from .report import Failure


class WorkerState(str, enum.Enum):
    INIT = "init"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What every worker of a node runs: ``python -m launcher.bootstrap <entrypoint...>``."""

    entrypoint: list[str]  # script.py args... or -m module args...
    nproc: int
    python: str = sys.executable
    log_dir: str | None = None
    only_ranks: frozenset[int] | None = None  # console filter; files always get everything
    tee: bool = True  # copy output to the console (the files get it anyway)
    cwd: str | None = None

    def argv(self) -> list[str]:
        return [self.python, "-u", "-m", "launcher.bootstrap", *self.entrypoint]


class Worker:
    def __init__(self, spec: WorkerSpec, rank: int, local_rank: int, host: str, env: dict[str, str]):
        self.spec, self.rank, self.local_rank, self.host, self.env = spec, rank, local_rank, host, env
        self.state = WorkerState.INIT
        self.proc: subprocess.Popen | None = None
        self.pumps: list[StreamPump] = []
        self.exit_time: float | None = None

    @property
    def error_file(self) -> str:
        return self.env["DISTTRAIN_ERROR_FILE"]

    def start(self) -> None:
        # The bootstrap asks for SIGKILL when we (its parent) die, if we are still its parent.
        self._spawn(self.spec.argv(), env={**self.env, "DISTTRAIN_AGENT_PID": str(os.getpid())})

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None, stdin=subprocess.DEVNULL) -> None:
        """Start ``argv`` with its output pumped to the rank's files and console (``[rank@host]``).
        Own session: we can signal it and anything it spawned as one group."""
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=self.spec.cwd,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        out_path, err_path = rank_log_paths(self.spec.log_dir, self.rank)
        prefix = f"[{self.rank}@{self.host}] "
        filt = set(self.spec.only_ranks) if self.spec.only_ranks is not None else None
        out_console = console_for(self.rank, filt, sys.stdout) if self.spec.tee else None
        err_console = console_for(self.rank, filt, sys.stderr) if self.spec.tee else None
        self.pumps = [
            StreamPump(self.proc.stdout, prefix, out_path, out_console),
            StreamPump(self.proc.stderr, prefix, err_path, err_console),
        ]
        for p in self.pumps:
            p.start()
        self.state = WorkerState.RUNNING

    def poll(self) -> int | None:
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is not None and self.state is WorkerState.RUNNING:
            self.exit_time = time.time()
            self.state = WorkerState.SUCCEEDED if code == 0 else WorkerState.FAILED
        return code

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.state is WorkerState.RUNNING:
            self.state = WorkerState.STOPPED
        self.signal(signal.SIGTERM)

    def kill_group(self) -> None:
        """SIGKILL the worker's whole process group (also reaps grandchildren left behind)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def join_output(self, timeout: float = 2.0) -> None:
        for p in self.pumps:
            p.join(timeout)

    def failure(self) -> Failure:
        from . import errorfile

        assert self.proc is not None and self.proc.returncode is not None
        tail = list(self.pumps[1].tail) if len(self.pumps) > 1 else []
        return Failure(
            rank=self.rank,
            local_rank=self.local_rank,
            host=self.host,
            pid=self.proc.pid,
            returncode=self.proc.returncode,
            time=self.exit_time or time.time(),
            stderr_tail=tail,
            error=errorfile.read(self.error_file),
        )

"""An elastic job's worker on another host: started by the driver over ssh, one ssh per worker.

    driver (launcher/driver.py) --ssh--> python -m launcher.elastic_remote --> bootstrap --> train.py

The elastic driver keeps each worker as its own process (workers come and go one by one), so a
worker on another host is an ssh session running this module there. :class:`RemoteWorker` is
the driver's side: a :class:`~launcher.worker.Worker` whose process is the ssh client; the
worker's argv, its environment (the job secret included) and its directory travel as one JSON
line on ssh's stdin, never on a command line. :func:`main` is the remote side: it starts the
worker in a session of its own (the bootstrap's parent check points at this process), passes
its output through ssh (the driver prefixes it ``[rank@host]``), exits with its code (128 + N
when killed by signal N), and stops it (SIGTERM, then SIGKILL after ``stop_grace``) when its
stdin closes: the driver stopped it, or the driver or the connection is gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

from .ssh import SshOptions, remote_command
from .worker import Worker, WorkerSpec, WorkerState


class RemoteWorker(Worker):
    """A worker on ``host``, reached with ``ssh``; ``base_env`` replaces this machine's
    environment (the remote keeps its own, plus what the driver sends)."""

    def __init__(self, spec: WorkerSpec, host: str, ssh: SshOptions, stop_grace: float = 5.0):
        super().__init__(spec, 0, 0, host, {})
        self.ssh, self.stop_grace = ssh, stop_grace

    def start(self) -> None:
        remote = remote_command(
            self.spec.python,
            self.spec.cwd or os.getcwd(),
            pythonpath=os.environ.get("PYTHONPATH"),
            module="launcher.elastic_remote",
        )
        msg = {"argv": self.spec.argv(), "env": self.env, "stop_grace": self.stop_grace}
        self._spawn(self.ssh.command(self.host, remote), stdin=subprocess.PIPE)
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()  # kept open: closing it stops the worker
        except OSError:
            pass  # ssh already failed; poll() reports it with ssh's stderr

    def stop(self) -> None:
        if self.state is WorkerState.RUNNING:
            self.state = WorkerState.STOPPED
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()  # the remote side stops the worker, then ssh ends
            except OSError:
                pass


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


def main() -> int:
    line = b""
    while not line.endswith(b"\n"):  # byte by byte: nothing after the line gets buffered
        ch = os.read(0, 1)
        if not ch:
            break
        line += ch
    if not line.strip():
        print("launcher.elastic_remote: no worker on stdin (the elastic driver starts this module)", file=sys.stderr)
        return 2
    msg = json.loads(line)
    env = {**os.environ, **msg["env"], "DISTTRAIN_AGENT_PID": str(os.getpid())}
    proc = subprocess.Popen(msg["argv"], env=env, stdin=subprocess.DEVNULL, start_new_session=True)

    def watch_stdin() -> None:
        try:  # the raw fd: a daemon thread must not hold sys.stdin's lock at exit
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(float(msg.get("stop_grace", 5.0)))
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # and whatever it left in its group
        except ProcessLookupError:
            pass

    threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
    return _exit_code(proc.wait())


if __name__ == "__main__":
    sys.exit(main())

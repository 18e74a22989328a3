"""Reaching other hosts: the system ``ssh`` client, in batch mode, with a bounded connect time.

The launcher builds one ``ssh`` command per remote host; the agent's configuration and
the job secret travel over ssh's stdin, never on a command line. The host comes after
``--`` (and names starting with ``-`` are refused), so it is never read as an option. Closing that stdin (or
losing the connection) is how a remote agent learns to stop.
"""

from __future__ import annotations

import dataclasses
import shlex
import socket

from .errors import LaunchConfigError


@dataclasses.dataclass(frozen=True)
class SshOptions:
    port: int | None = None
    identity: str | None = None
    user: str | None = None
    connect_timeout: float = 10.0  # seconds; an unreachable host fails within this
    options: tuple[str, ...] = ()  # extra ``-o KEY=VALUE`` (e.g. StrictHostKeyChecking=accept-new)
    program: str = "ssh"

    def command(self, host: str, remote: str) -> list[str]:
        argv = [
            self.program,
            "-T",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={max(1, round(self.connect_timeout))}",
            "-o",
            "ServerAliveInterval=5",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "LogLevel=ERROR",
        ]
        if self.port:
            argv += ["-p", str(self.port)]
        if self.identity:
            argv += ["-i", self.identity]
        if self.user:
            argv += ["-l", self.user]
        for opt in self.options:
            argv += ["-o", opt]
        if host.startswith("-"):  # never an option; hostfile.check_host refuses it earlier
            raise LaunchConfigError(f"refusing host name {host!r}: it would be read as an ssh option")
        return argv + ["--", host, remote]  # "--": whatever the host is, it is not an option

    def describe(self, host: str) -> str:
        """The command a user can paste to check the host (for HINT lines)."""
        return " ".join(shlex.quote(a) for a in self.command(host, "true"))


def remote_command(python: str, cwd: str, *, pythonpath: str | None = None, module: str = "launcher.remote") -> str:
    """``cd CWD && exec PYTHON -u -m launcher.remote`` for the remote shell (no secrets in it)."""
    env = f"PYTHONPATH={shlex.quote(pythonpath)} " if pythonpath else ""
    return f"cd {shlex.quote(cwd)} && exec env {env}{shlex.quote(python)} -u -m {module}"


def is_local(host: str) -> bool:
    """True when ``host`` is this machine (a loopback name, our host name, or one of our addresses)."""
    if host in ("localhost", "127.0.0.1", "::1", socket.gethostname()):
        return True
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        return False
    if addr.startswith("127."):
        return True
    with socket.socket() as s:
        try:
            s.bind((addr, 0))  # binds only to an address this machine (network namespace) owns
            return True
        except OSError:
            return False

"""Which hosts an elastic job may use now: horovodrun's ``--host-discovery-script``.

The script is the user's: it prints the hosts available right now, one a line, ``host`` or
``host:slots`` (``slots`` defaults to ``--slots-per-host``, else 1), and exits 0. The elastic
driver (:mod:`launcher.driver`) runs it every ``interval`` seconds and compares the answer with
the previous one (:func:`diff`); a change makes a new world. Host names pass the same check as
``--hosts`` (no name starting with ``-``), the order of the lines is kept (the driver fills hosts
in that order), and a script that fails, hangs past ``timeout`` or prints a bad line raises
:class:`DiscoveryError` naming the script and the line: the driver keeps the hosts it had.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
from typing import Protocol

from .errors import LauncherError
from .hostfile import check_host


class DiscoveryError(LauncherError):
    """The discovery script failed, timed out, or printed a line that is not ``host[:slots]``."""


@dataclasses.dataclass(frozen=True)
class HostsChange:
    """What changed between two answers of the script (a host whose slots changed is in both)."""

    added: tuple[str, ...]
    removed: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)

    def describe(self) -> str:
        parts = [f"added {', '.join(self.added)}"] if self.added else []
        parts += [f"removed {', '.join(self.removed)}"] if self.removed else []
        return "; ".join(parts) or "no change"


def parse_hosts_output(text: str, script: str, slots_per_host: int = 1) -> dict[str, int]:
    """``host[:slots]`` lines -> {host: slots}, in the script's order. Blank lines are skipped."""
    hosts: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        # one colon: host:slots; none, or several (an IPv6 address): the host alone
        host, _, slots = line.partition(":") if line.count(":") == 1 else (line, "", "")
        where = f"{script}: line {n}"
        check_host(host, where)
        try:
            count = int(slots) if slots else slots_per_host
        except ValueError:
            raise DiscoveryError(
                f"{where}: {line!r}: expected host or host:slots\nHINT: print e.g. 'node1:4', one host a line"
            ) from None
        if count < 1:
            raise DiscoveryError(f"{where}: {line!r}: slots must be at least 1")
        if host in hosts:
            raise DiscoveryError(f"{where}: host {host} is listed twice")
        hosts[host] = count
    return hosts


def diff(before: dict[str, int], after: dict[str, int]) -> HostsChange:
    added = tuple(h for h in after if h not in before or after[h] != before[h])
    removed = tuple(h for h in before if h not in after or after[h] != before[h])
    return HostsChange(added, removed)


class Discovery(Protocol):
    """What the driver asks of a source of hosts: the hosts usable now (may block briefly)."""

    def find(self) -> dict[str, int]: ...


class FixedHosts:
    """``--min-np`` with ``--hosts``/``--hostfile`` and no script: the same hosts every time
    (workers that fail still blacklist theirs)."""

    def __init__(self, hosts: dict[str, int]):
        self.hosts = dict(hosts)

    def find(self) -> dict[str, int]:
        return dict(self.hosts)


class HostDiscovery:
    """Runs the script on request (the driver's loop calls :meth:`find`); not a thread."""

    def __init__(self, script: str, *, slots_per_host: int = 1, timeout: float = 10.0):
        self.script, self.slots_per_host, self.timeout = script, slots_per_host, timeout
        self.argv = shlex.split(script)
        if not self.argv:
            raise DiscoveryError("--host-discovery-script is empty")

    def find(self) -> dict[str, int]:
        """Run the script once; blocks up to ``timeout`` seconds."""
        try:
            done = subprocess.run(
                self.argv, capture_output=True, text=True, timeout=self.timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            raise DiscoveryError(
                f"host discovery script {self.script} did not finish within {self.timeout:g}s"
            ) from None
        except OSError as exc:
            raise DiscoveryError(
                f"cannot run host discovery script {self.script}: {exc.strerror}\n"
                "HINT: give the path of an executable file (chmod +x) that prints host:slots lines"
            ) from None
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise DiscoveryError(f"host discovery script {self.script} exited with code {done.returncode}: {tail}")
        return parse_hosts_output(done.stdout, self.script, self.slots_per_host)

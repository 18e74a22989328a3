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
import os
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
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
        try:
            check_host(host, where)
        except LauncherError as exc:  # the driver keeps its hosts on a DiscoveryError
            raise DiscoveryError(str(exc)) from None
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
    """Runs the script on request (the driver's loop calls :meth:`find`); not a thread.

    The command line is split with ``shlex`` and run without a shell; its program must be a
    regular file that only its owner (this user or root) may write, as every file the launcher
    reads (checked here, once: a refused script stops the launch). Output beyond
    ``MAX_OUTPUT`` bytes, or not UTF-8, is refused; on a timeout the script's whole process group
    is killed (a ``sleep`` it started must not keep running, nor keep the driver waiting)."""

    MAX_OUTPUT = 1 << 20

    def __init__(self, script: str, *, slots_per_host: int = 1, timeout: float = 10.0):
        self.script, self.slots_per_host, self.timeout = script, slots_per_host, timeout
        self.argv = shlex.split(script)
        if not self.argv:
            raise DiscoveryError("--host-discovery-script is empty")
        self.program = check_program(self.argv[0], script)

    def find(self) -> dict[str, int]:
        """Run the script once; blocks up to ``timeout`` seconds."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    [self.program, *self.argv[1:]],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
            except OSError as exc:
                raise DiscoveryError(
                    f"cannot run host discovery script {self.script}: {exc.strerror}\n"
                    "HINT: give the path of an executable file (chmod +x) that prints host:slots lines"
                ) from None
            try:
                code = proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                try:  # the script's children too (it runs in a session of its own)
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
            if code is None:
                raise DiscoveryError(f"host discovery script {self.script} did not finish within {self.timeout:g}s")
            if code != 0:
                tail = (_read(err, 4096).strip().splitlines() or ["no output"])[-1]
                raise DiscoveryError(f"host discovery script {self.script} exited with code {code}: {tail}")
            if os.fstat(out.fileno()).st_size > self.MAX_OUTPUT:
                raise DiscoveryError(
                    f"host discovery script {self.script} printed more than {self.MAX_OUTPUT} bytes"
                    "\nHINT: it should print one host[:slots] line per host"
                )
            text = _read(out, self.MAX_OUTPUT)
        try:
            return parse_hosts_output(text, self.script, self.slots_per_host)
        except LauncherError as exc:
            raise DiscoveryError(str(exc)) from None


def _read(f, limit: int) -> str:
    f.seek(0)
    data = f.read(limit)
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise DiscoveryError(f"host discovery output is not UTF-8 text: {data[:40]!r}...") from None


def check_program(name: str, script: str) -> str:
    """The program the script line names, resolved as ``execvp`` would, if it is a regular file
    that no other user may write (owner: this user or root; no group/other write); else
    :class:`DiscoveryError` naming it. Returns its path."""
    path = name if os.sep in name else shutil.which(name)
    if path is None:
        raise DiscoveryError(f"host discovery script {script}: {name} is not on PATH")
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DiscoveryError(f"host discovery script {script}: cannot read {path}: {exc.strerror}") from None
    why = None
    if not stat.S_ISREG(st.st_mode):
        why = "is not a regular file"
    elif st.st_uid not in (os.geteuid(), 0):
        why = f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}) or root"
    elif st.st_mode & 0o022:
        why = f"has mode {stat.S_IMODE(st.st_mode):04o}: group or others may write it"
    if why:
        raise DiscoveryError(
            f"host discovery script {path} {why}; refusing to run it\nHINT: chown it to yourself and chmod go-w {path}"
        )
    return path

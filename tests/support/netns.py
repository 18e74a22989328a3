"""Several "hosts" on one machine: network namespaces on a bridge, each with a real sshd.

    from tests.support.netns import net_hosts, skip_reason   # the two_hosts fixture is in tests/conftest.py

    with net_hosts(2) as hosts:
        hosts.run(0, ["python", "-m", "launcher.cli", *hosts.launcher_flags(), "--hosts",
                      f"{hosts.addrs[0]}:2,{hosts.addrs[1]}:2", "train.py"])

Layout: namespace ``<tag>br`` holds bridge ``br0``; host ``i`` is namespace ``<tag>h<i>``
with interface ``eth0`` (the same name on every host, so ``GLOO_SOCKET_IFNAME=eth0``
works everywhere) at ``10.<a>.<b>.<i+1>/24``, and an sshd listening on that address with
a host key and an authorized user key generated for this fixture. Everything (processes
in the namespaces, the namespaces, the key directory) is removed on exit, also after a
failure; namespaces left by a killed earlier run are removed when their process is gone.
Needs root, ``ip`` (iproute2), ``sshd`` and ``ssh-keygen``: see :func:`skip_reason`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
TAG = "dtn"  # namespace names: dtn<pid>x<n>br, dtn<pid>x<n>h0, ...


def skip_reason() -> str | None:
    """Why the multi-host tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2 openssh-client)"
    if not os.path.exists(SSHD):
        return "sshd is not installed (apt-get install openssh-server)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=20)


def _ns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split()]


def _delete_ns(ns: str) -> None:
    for _ in range(3):
        pids = _ns_pids(ns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not pids:
            break
        time.sleep(0.1)
    _ip("netns", "del", ns, check=False)


def _remove_stale() -> None:
    """Namespaces of an earlier run whose process died without cleaning up."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(TAG) and "x" in name:
            pid = name[len(TAG) :].split("x", 1)[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                _delete_ns(name)


@dataclasses.dataclass
class NetHosts:
    namespaces: list[str]
    addrs: list[str]
    key: str  # private key authorized on every host (user root)
    known_hosts: str
    workdir: str
    ifname: str = "eth0"
    sshd_procs: list[subprocess.Popen] = dataclasses.field(default_factory=list)

    def ssh_options(self) -> list[str]:
        """``-o`` options for a plain ``ssh``/``scp`` to any of the hosts."""
        return [
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "LogLevel=ERROR",
            "-i",
            self.key,
        ]

    def launcher_flags(self) -> list[str]:
        """Flags for ``disttrain launch`` / ``python -m launcher.cli`` to reach the hosts."""
        return [
            "--ssh-identity",
            self.key,
            "--ssh-option",
            "StrictHostKeyChecking=no",
            "--ssh-option",
            f"UserKnownHostsFile={self.known_hosts}",
        ]

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[i]]

    def popen(self, i: int, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` inside host ``i``'s namespace."""
        return subprocess.Popen(self.exec_prefix(i) + list(argv), **kw)

    def run(self, i: int, argv: list[str], timeout: float = 120.0, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.exec_prefix(i) + list(argv), timeout=timeout, **kw)

    def pids(self, i: int) -> list[int]:
        """Processes in host ``i``'s namespace other than its sshd listener."""
        sshd = {p.pid for p in self.sshd_procs}
        return [p for p in _ns_pids(self.namespaces[i]) if p not in sshd]


def _sshd_config(workdir: str, i: int, addr: str, host_key: str, authorized: str) -> str:
    path = os.path.join(workdir, f"sshd_{i}.conf")
    with open(path, "w") as f:
        f.write(f"""Port 22
ListenAddress {addr}
HostKey {host_key}
PidFile {workdir}/sshd_{i}.pid
AuthorizedKeysFile {authorized}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
MaxStartups 100
MaxSessions 100
""")
    return path


def _wait_listening(addr: str, ns: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    probe = f"import socket; socket.create_connection(('{addr}', 22), timeout=1).close()"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd in {ns} exited with {proc.returncode}: {proc.stderr.read()}")
        if subprocess.run(["ip", "netns", "exec", ns, "python3", "-c", probe], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"sshd in {ns} did not listen on {addr}:22 within {timeout}s")


@contextlib.contextmanager
def net_hosts(n: int = 2, *, sshd: bool = True):
    """Yield :class:`NetHosts` for ``n`` hosts; tear everything down afterwards, whatever happens."""
    reason = skip_reason()
    if reason:
        raise RuntimeError(reason)
    _remove_stale()
    tag = f"{TAG}{os.getpid()}x{random.randrange(1000)}"
    net = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
    bridge = f"{tag}br"
    hosts = NetHosts(
        namespaces=[f"{tag}h{i}" for i in range(n)],
        addrs=[f"{net}.{i + 1}" for i in range(n)],
        key="",
        known_hosts="",
        workdir=tempfile.mkdtemp(prefix="disttrain-netns-"),
    )
    made: list[str] = []
    try:
        _ip("netns", "add", bridge)
        made.append(bridge)
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge, "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(zip(hosts.namespaces, hosts.addrs)):
            _ip("netns", "add", ns)
            made.append(ns)
            # Create the pair inside the host namespace (no names in the root namespace), move one end.
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}")
            _ip("-n", ns, "link", "set", f"p{i}", "netns", bridge)
            _ip("-n", bridge, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        if sshd:
            w = hosts.workdir
            for name in ("host_key", "user_key"):
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(w, name)],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
            shutil.copy(os.path.join(w, "user_key.pub"), os.path.join(w, "authorized_keys"))
            hosts.key, hosts.known_hosts = os.path.join(w, "user_key"), os.path.join(w, "known_hosts")
            os.makedirs("/run/sshd", exist_ok=True)
            for i, (ns, addr) in enumerate(zip(hosts.namespaces, hosts.addrs)):
                conf = _sshd_config(w, i, addr, os.path.join(w, "host_key"), os.path.join(w, "authorized_keys"))
                proc = subprocess.Popen(
                    ["ip", "netns", "exec", ns, SSHD, "-D", "-e", "-f", conf],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                hosts.sshd_procs.append(proc)
            for i, (ns, addr) in enumerate(zip(hosts.namespaces, hosts.addrs)):
                _wait_listening(addr, ns, hosts.sshd_procs[i])
        yield hosts
    finally:
        for p in hosts.sshd_procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(Exception):
                p.wait(5)
            if p.stderr:
                p.stderr.close()
        for ns in reversed(made):
            _delete_ns(ns)
        shutil.rmtree(hosts.workdir, ignore_errors=True)


def free_port_in(hosts: NetHosts, i: int) -> int:
    """A port free on host ``i`` (namespaces have their own port spaces; high random is fine)."""
    out = hosts.run(
        i, ["python3", "-c", "import socket; s=socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"]
    )
    return int(out.stdout)


__all__ = ["NetHosts", "free_port_in", "net_hosts", "skip_reason"]

"""Which TCP/UDP sockets a process tree listens on, read from /proc while it runs (no tools
needed), and a private /etc/hosts that maps this host's name to its routable address, as on a
cluster node (``unshare -m`` plus a bind mount; needs root)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time


def routable_address() -> str | None:
    """This machine's first non-loopback IPv4 address, or None."""
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] != "lo":
            return parts[3].split("/")[0]
    return None


def hosts_file(path: str, address: str) -> str:
    with open(path, "w") as f:
        f.write(f"127.0.0.1 localhost\n{address} {socket.gethostname()}\n")
    return path


def in_private_hosts(hosts: str, argv: list[str]) -> list[str]:
    """``argv`` run with ``hosts`` bind-mounted over /etc/hosts in a mount namespace of its own."""
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, hosts, *argv]


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(children.get(p, []))
    return out


def _socket_inodes(pids: set[int]) -> dict[str, int]:
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    return inodes


def _addr(hexaddr: str) -> str:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw[::-1])}:{int(port, 16)}"
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]:{int(port, 16)}"


def listening(pids: set[int]) -> set[tuple[str, str, str]]:
    """(protocol, local address, process name) of every listening TCP / bound UDP socket of ``pids``."""
    inodes = _socket_inodes(pids)
    found = set()
    for proto, listen_state in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
        try:
            with open(f"/proc/net/{proto}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == listen_state and cols[9] in inodes:
                try:
                    with open(f"/proc/{inodes[cols[9]]}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                found.add((proto, _addr(cols[1]), comm))
    return found


class Scanner:
    """Samples the listeners of a process tree every ``period`` seconds until stopped."""

    def __init__(self, root: int, period: float = 0.05):
        self.root, self.period, self.seen = root, period, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen |= listening(_descendants(self.root))
            time.sleep(self.period)

    def stop(self) -> set[tuple[str, str, str]]:
        self._stop.set()
        self._thread.join(10)
        return self.seen


def off_loopback(seen: set[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    return sorted(s for s in seen if not s[1].startswith(("127.", "[::1]")))


def unix_listening(root: int) -> dict[str, int]:
    """Path (``@name`` for the abstract namespace) -> pid, of every listening Unix socket of the
    process tree under ``root`` (/proc/net/unix: flag ``__SO_ACCEPTCON``)."""
    inodes = _socket_inodes(_descendants(root))
    found = {}
    with open("/proc/net/unix") as f:
        for row in f.read().splitlines()[1:]:
            cols = row.split(None, 7)
            if len(cols) == 8 and int(cols[3], 16) & 0x10000 and cols[6] in inodes:
                found[cols[7]] = inodes[cols[6]]
    return found

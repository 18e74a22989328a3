"""Which hosts run how many workers: hostfiles, ``--hosts a:2,b:2``, horovodrun's ``-np``/``-H``.

A hostfile has one host a line, as DeepSpeed and Horovod read them::

    # comments and blank lines are fine
    node1 slots=4
    node2 slots=4
    node3            # one slot

:func:`plan_nodes` turns hosts and counts into one :class:`NodePlan` per host that runs
workers, with its global rank offset, and rejects counts the hosts cannot hold.
"""

from __future__ import annotations

import dataclasses
import re

from .errors import LaunchConfigError


@dataclasses.dataclass(frozen=True)
class HostSlots:
    host: str
    slots: int | None = None  # None: not stated (a hostfile line without slots=, or --hosts a)


@dataclasses.dataclass(frozen=True)
class NodePlan:
    node_rank: int
    host: str
    nproc: int
    rank_offset: int


_HOST = re.compile(r"[A-Za-z0-9_.:%@\[\]-]{1,255}")


def check_host(host: str, where: str) -> str:
    """Refuse a host name that a command line could read as something else: one starting with
    ``-`` (``-oProxyCommand=...`` is an ssh option, not a host), or with characters no host,
    address or ``user@host`` has. Returns the name."""
    if host.startswith("-") or not _HOST.fullmatch(host):
        raise LaunchConfigError(
            f"{where}: {host!r} is not a host name (names start with a letter, digit or '[' and hold "
            "letters, digits and . _ : % @ [ ] -). HINT: it was not passed to ssh"
        )
    return host


_LINE = re.compile(r"^(?P<host>[^\s#]+)(?:\s+slots\s*=\s*(?P<slots>\S+))?\s*(?:max_slots\s*=\s*\S+\s*)?$")


def parse_hostfile(path: str) -> list[HostSlots]:
    """Read ``host slots=N`` lines; ``#`` starts a comment."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise LaunchConfigError(f"cannot read hostfile {path}: {exc.strerror}") from None
    hosts = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            raise LaunchConfigError(f"{path}:{n}: cannot read {raw.strip()!r}. HINT: lines look like 'node1 slots=4'")
        hosts.append(HostSlots(check_host(m["host"], f"{path}:{n}"), _slots(m["slots"], f"{path}:{n}")))
    if not hosts:
        raise LaunchConfigError(f"hostfile {path} names no hosts")
    _no_duplicates(hosts, path)
    return hosts


def parse_hosts(text: str, flag: str = "--hosts") -> list[HostSlots]:
    """``a:2,b:2`` (or ``a,b``: slots unstated)."""
    hosts = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        host, sep, slots = item.rpartition(":")
        if not sep:
            host, slots = item, None
        hosts.append(HostSlots(check_host(host, flag), _slots(slots, f"{flag} {item!r}")))
    if not hosts:
        raise LaunchConfigError(f"{flag} names no hosts. HINT: {flag} node1:2,node2:2")
    _no_duplicates(hosts, flag)
    return hosts


def _slots(text: str | None, where: str) -> int | None:
    if text is None:
        return None
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 1:
        raise LaunchConfigError(f"{where}: slots must be a positive integer, got {text!r}")
    return n


def _no_duplicates(hosts: list[HostSlots], where: str) -> None:
    seen = set()
    for h in hosts:
        if h.host in seen:
            raise LaunchConfigError(
                f"{where}: host {h.host} is listed twice. HINT: give it one line with all its slots"
            )
        seen.add(h.host)


def plan_nodes(hosts: list[HostSlots], *, np: int | None = None, nproc_per_node: int | None = None) -> list[NodePlan]:
    """One plan per host that gets workers; ranks are contiguous per host, in host order.

    * ``np`` (horovodrun's ``-np``): fill hosts in order up to their slots (1 if unstated).
    * ``nproc_per_node`` (torchrun's): that many on every host, which must have the slots.
    * neither: every host runs its slots (1 if unstated).
    """
    for h in hosts:  # JobSpec built in Python skips the parsers
        check_host(h.host, "JobSpec.hosts")
    if np is not None and nproc_per_node is not None:
        counts = [nproc_per_node] * len(hosts)
        if sum(counts) != np:
            raise LaunchConfigError(
                f"-np {np} does not match --nproc-per-node {nproc_per_node} on {len(hosts)} "
                f"host(s) ({sum(counts)} workers). HINT: give one of the two"
            )
    elif np is not None:
        if np < 1:
            raise LaunchConfigError(f"-np must be at least 1, got {np}")
        total = sum(h.slots or 1 for h in hosts)
        if np > total:
            listing = ", ".join(f"{h.host}:{h.slots or 1}" for h in hosts)
            raise LaunchConfigError(
                f"-np {np} asks for more workers than the hosts have slots ({total}: {listing}). "
                "HINT: add hosts, raise slots=, or lower -np"
            )
        counts, left = [], np
        for h in hosts:
            counts.append(min(h.slots or 1, left))
            left -= counts[-1]
    elif nproc_per_node is not None:
        if nproc_per_node < 1:
            raise LaunchConfigError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
        for h in hosts:
            if h.slots is not None and h.slots < nproc_per_node:
                raise LaunchConfigError(
                    f"host {h.host} has {h.slots} slot(s) but --nproc-per-node asks for "
                    f"{nproc_per_node}. HINT: raise its slots= or lower --nproc-per-node"
                )
        counts = [nproc_per_node] * len(hosts)
    else:
        counts = [h.slots or 1 for h in hosts]
    plans, offset = [], 0
    for h, n in zip(hosts, counts):
        if n > 0:
            plans.append(NodePlan(len(plans), h.host, n, offset))
            offset += n
    return plans

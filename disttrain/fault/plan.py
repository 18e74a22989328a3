"""What each rank's peer copy holds, and where (:mod:`disttrain.fault.replica`).

The disk checkpoint's write plan (:func:`~disttrain.checkpoint.write_plan.plan_writes`) has each
replicated box written once, by one holder, so a copy of every rank tiles the state. Sent as is, a
replicated box then crosses the network to ``replicas`` other hosts, although under ddp (and the dp
axis of any layout) the ranks of those hosts hold the same bits already: at one copy per step that
traffic, and the holders' CPU to take it in, was the largest part of what copies add to a ddp step.

So a replicated box whose holders sit on at least as many hosts as a copy has holders (the own
host and ``replicas`` others, :func:`~disttrain.fault.replica.targets`) is *host-local*: on every
host that holds it, one of its ranks puts it in the copy it hands its own host's agent (the
``extra`` part), and no rank sends it to another host. Losing any ``replicas`` hosts leaves a host
whose agent holds it, as before. This applies when every box of the state is host-local (ddp, a dp
axis across hosts over everything). Where some rank has shards to send anyway (zero3's own shards,
boxes held on fewer hosts) its copy for other hosts would be a second file, staged and tagged beside
its own host's (zero3, a few small replicated boxes: the copy thread went 4.7 -> 6.9 ms a copy), so
then every box goes as the write plan says, to every holder (the ``remote`` part).

A rank's own host then holds its copy with the extra boxes, other hosts hold it without them (the
same rank and step, two records); recovery takes for each rank the copy with the most pieces and
drops a box it finds twice (:mod:`disttrain.fault.recovery`): the bits are the same, as the write
plan already assumes when it saves a replicated box once.

Who calls: every rank, once, at its first copy, with everyone's shard signatures and hosts (one
allgather each); the answer is the same function of the same inputs on every rank.
"""

from __future__ import annotations

import json

from ..checkpoint.write_plan import plan_writes


def copy_plan(sigs: list[list], nodes: list[int], rank: int, hosts: int, replicas: int) -> tuple[list[int], list[int]]:
    """``(remote, extra)``: indices into rank ``rank``'s shards. ``sigs``: every rank's
    :func:`~disttrain.checkpoint.write_plan.shard_signature`; ``nodes``: every rank's host
    (``GROUP_RANK``); ``hosts``: how many hosts hold copies; ``replicas``: ``fault_tolerance.replicas``.
    ``remote`` goes to the own host and ``replicas`` others; ``extra`` to the own host only."""
    raw = [json.dumps(s).encode() for s in sigs]
    written = plan_writes(sigs[rank], rank, lambda _b: raw)
    need = min(replicas, hosts - 1) + 1  # hosts a copy lives on (targets())

    def key(entry) -> str:
        name, box, flat, _n, _rep = entry
        return json.dumps([name, box, flat])

    holders: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}
    plain = json.loads(json.dumps(sigs))
    for r, sig in enumerate(plain):
        for entry in sig:
            if entry[4]:
                holders.setdefault(key(entry), []).append(r)
                sizes[key(entry)] = entry[3]
    local = {k for k, rs in holders.items() if len({nodes[r] for r in rs}) >= need}
    if len(local) < len(holders) or any(not e[4] for sig in plain for e in sig):
        return written, []  # some rank sends shards anyway: keeping boxes home would stage and tag those twice
    keeper: dict[tuple[str, int], int] = {}  # (box, host) -> the rank that keeps it for that host
    load = [0] * len(sigs)
    for k in sorted(local, key=lambda k: (-sizes[k], k)):  # balanced by bytes, as plan_writes
        for host in sorted({nodes[r] for r in holders[k]}):
            r = min((r for r in holders[k] if nodes[r] == host), key=lambda x: (load[x], x))
            keeper[(k, host)] = r
            load[r] += sizes[k]
    mine = plain[rank]
    remote = [i for i in written if not (mine[i][4] and key(mine[i]) in local)]
    extra = [i for i, e in enumerate(mine) if e[4] and key(e) in local and keeper[(key(e), nodes[rank])] == rank]
    return remote, extra

"""Which rank writes which shard: every rank writes its own shards, and each replicated box is written
by exactly one of its holders, balancing the bytes. The checkpointer and the peer replicas
(``disttrain.fault``) share it, so a disk checkpoint and a copy in memory hold the same pieces."""

from __future__ import annotations

import json


def shard_signature(shards: list) -> list:
    """What :func:`plan_writes` compares across ranks: each shard's name, box, flatness, bytes, replication."""
    return [
        (s.name, [list(b) for b in s.box], s.flat, s.tensor.numel() * s.tensor.element_size(), bool(s.replicated))
        for s in shards
    ]


def plan_writes(sig: list, rank: int, allgather_bytes) -> list[int]:
    """Every rank, together (one allgather): indices of this rank's shards that it writes: all of its
    own, and a balanced share of the replicated ones (each replicated box is written by exactly one
    of its holders). The checkpointer and the peer replicas (disttrain.fault) share it."""
    everyone = [json.loads(b) for b in allgather_bytes(json.dumps(sig).encode())]
    load = [sum(n for _, _, _, n, rep in sg if not rep) for sg in everyone]
    holders: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}
    for r, sg in enumerate(everyone):
        for name, box, flat, n, rep in sg:
            if rep:
                key = json.dumps([name, box, flat])
                holders.setdefault(key, []).append(r)
                sizes[key] = n
    owner = {}
    for key in sorted(holders, key=lambda k: (-sizes[k], k)):
        r = min(holders[key], key=lambda x: (load[x], x))
        owner[key] = r
        load[r] += sizes[key]
    return [
        i
        for i, (name, box, flat, _, rep) in enumerate(json.loads(json.dumps(sig)))
        if not rep or owner[json.dumps([name, box, flat])] == rank
    ]

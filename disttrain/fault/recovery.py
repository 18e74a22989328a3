"""Recovery without disk: find the newest complete copy of every rank's state in the surviving
agents' memory (written by :mod:`disttrain.fault.replica`) and serve it to the checkpoint loader.

Who calls what: the checkpointer's ``resume()`` (all ranks, at the start of a round) asks rank 0 for
:meth:`PeerStore.newest` (a plan: the step, the old world size, which holder has each old rank's
copy; of a rank's copies the one with the most pieces, its own host's with the host-local boxes of
:mod:`disttrain.fault.plan`; a box found in two copies is read from one), broadcasts it, and every rank
loads through :meth:`PeerStore.reader`, a
:class:`~disttrain.checkpoint.CheckpointReader` whose files are the copies. The manifest is built
from the copies' records and validated like a disk manifest; the strategy's loader then asks for
boxes, and the reader reshards them to the new world size as it does for files. A copy is fetched
only when one of its pieces is asked for, and used only when its size and end-to-end tag
(:mod:`disttrain.fault.tag`, keyed: bytes changed on the wire or in a holder are refused) match its
record. Any failure makes ``resume()`` fall back to the disk checkpoint.
"""

from __future__ import annotations

import json
import logging
import math

import torch

from launcher import connect_replica, replica_addresses_from_env, replica_tag_key

from ..checkpoint import checksum
from ..checkpoint import manifest as manifest_mod
from ..checkpoint import state as state_mod
from ..checkpoint.errors import CheckpointCorruptError, CheckpointFormatError
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.writer import build_manifest
from . import tag as tag_mod
from .replica import chunk_key, record_key, steps_key

log = logging.getLogger(__name__)
MAX_RECORD = 64 << 20  # a record larger than this is not one a rank wrote


class PeerStore:
    """The surviving agents' replica stores of this round (``DISTTRAIN_REPLICA_STORES``)."""

    def __init__(self, where: str, timeout: float, addresses: list[str] | None = None):
        self.where, self.timeout = where, timeout
        self.addresses = addresses if addresses is not None else (replica_addresses_from_env() or [])
        self._clients: dict[str, object] = {}
        self.bytes_fetched = 0
        self.missing: tuple[int, int] | None = None  # (step, rank): the newest copy no surviving holder has whole

    def _client(self, address: str):
        if address not in self._clients:
            self._clients[address] = connect_replica(address, timeout=self.timeout)
        return self._clients[address]

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()

    # -- rank 0: the plan --------------------------------------------------------------------
    def newest(self) -> dict | None:
        """The newest step of which every rank of the world that wrote it has a complete copy on a
        reachable holder: ``{"step", "world", "holders": [address per old rank]}``, or None. When
        copies exist but none is whole, ``missing`` says which rank of which step is gone (its
        holders were lost too: more hosts than ``fault_tolerance.replicas`` at once)."""
        held: dict[str, dict[int, list[int]]] = {}  # address -> rank -> complete steps

        def steps_of(address: str, rank: int) -> list[int]:
            by_rank = held.setdefault(address, {})
            if rank not in by_rank:
                c = self._client(address)
                by_rank[rank] = json.loads(c.get(steps_key(rank))) if c.check([steps_key(rank)]) else []
            return by_rank[rank]

        alive = []
        for a in self.addresses:
            try:
                steps_of(a, 0)
                alive.append(a)
            except Exception as exc:  # a holder we cannot reach holds nothing for us
                log.warning("rank %s: replica store %s unreachable: %s", self.where, a, exc)
        for step in sorted({s for a in alive for s in held[a][0]}, reverse=True):
            first = next(a for a in alive if step in held[a][0])
            world = int(self._record(first, 0, step)["world"])
            holders, records = [], []
            for r in range(world):
                found = [a for a in alive if step in steps_of(a, r)]
                if not found:
                    self.missing = self.missing or (step, r)
                    break
                # a rank's own host holds its copy with the host-local boxes (disttrain.fault.plan): the most pieces
                recs = [self._record(a, r, step) for a in found]
                best = max(range(len(found)), key=lambda i: len(recs[i].get("pieces") or ()))
                holders.append(found[best])
                records.append(recs[best])
            if len(holders) == world:
                if not _covers(records):  # the host-local boxes' holders of this step are gone: an older step
                    log.warning("rank %s: the surviving copies of step %d do not cover the state", self.where, step)
                    self.missing = self.missing or (step, -1)  # -1: no one rank's copy is missing
                    continue
                return {"step": step, "world": world, "holders": holders}
        return None

    def _record(self, address: str, rank: int, step: int) -> dict:
        raw = self._client(address).get(record_key(rank, step))
        if len(raw) > MAX_RECORD:
            raise CheckpointFormatError(f"replica store {address}: the record of rank {rank} is {len(raw)} bytes")
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise CheckpointFormatError(f"replica store {address}: the record of rank {rank}: {exc}") from None

    # -- every rank: the reader ------------------------------------------------------------------
    def reader(self, plan: dict) -> MemoryReader:
        step, holders = int(plan["step"]), list(plan["holders"])
        records = [self._record(a, r, step) for r, a in enumerate(holders)]
        return MemoryReader(self, step, holders, records)


def _covers(records: list[dict]) -> bool:
    """Whether the distinct boxes of ``records``' pieces fill every tensor of the state (each record
    names them all: ``tensors``); a box found in two copies, a replicated one, counts once. True for
    records without pieces (not ours to judge: the reader's manifest validation has the last word)."""
    if any("pieces" not in r for r in records):
        return True
    filled: dict[str, int] = {n: 0 for r in records for n in r.get("tensors") or ()}
    sizes: dict[str, int] = {}
    for rec in _distinct_pieces(records):
        for p in rec["pieces"]:
            filled[p["name"]] = filled.get(p["name"], 0) + math.prod(b - a for a, b in p["box"])
            sizes[p["name"]] = math.prod(p["shape"])
    return all(filled[n] == sizes.get(n, -1) for n in filled)


def _distinct_pieces(records: list[dict]) -> list[dict]:
    """``records`` with each box kept in its first copy only: a replicated box is in the copy of each
    host that keeps it (disttrain.fault.plan), with the same bits; a manifest lists it once."""
    seen: set[str] = set()
    out = []
    for rec in records:
        pieces = []
        for p in rec["pieces"]:
            k = json.dumps([p["name"], p["box"], p["flat"]])
            if k not in seen:
                seen.add(k)
                pieces.append(p)
        out.append({**rec, "pieces": pieces})
    return out


class MemoryReader(CheckpointReader):
    """A checkpoint whose files are the ranks' copies in peers' memory (see the module docstring)."""

    def __init__(self, peers: PeerStore, step: int, holders: list[str], records: list[dict]):
        self.peers, self.holders, self.verify = peers, holders, True
        self.path = f"peer memory (step {step})"
        where = self.path
        try:
            shared = dict(records[0]["shared"])
            layout = shared.pop("layout")
            layout["world_size"] = len(records)
            shared["rng"] = [r["state"]["rng"] for r in records]
            self._state = shared
            state_bytes = json.dumps(shared, separators=(",", ":")).encode()
            self.manifest = build_manifest(
                step, len(records), layout, _distinct_pieces(records), len(state_bytes), checksum.digest(state_bytes)
            )
            manifest_mod.validate(self.manifest, where)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointFormatError(f"{where}: the copies' records do not make a checkpoint: {exc}") from None
        self._rank_of = {r["file"]: i for i, r in enumerate(records)}
        self._chunks = {r["file"]: int(r["chunks"]) for r in records}
        self._tags = {r["file"]: r.get("tag") for r in records}
        self._tag_key = replica_tag_key()
        self._blobs: dict[str, bytes] = {}
        self._verified: set[str] = set()
        self.names = frozenset(self.manifest.tensors)

    def where(self, file: str) -> str:
        r = self._rank_of.get(file, "?")
        holder = self.holders[r] if isinstance(r, int) else "?"
        return f"{self.path}: the copy of rank {r} held at {holder}"

    def _blob(self, name: str) -> bytes:
        if name not in self._blobs:
            info = self.manifest.files.get(name)
            if name not in self._rank_of or info is None:
                raise CheckpointFormatError(f"{self.path}: {name!r} is not one of the copies")
            r = self._rank_of[name]
            client = self.peers._client(self.holders[r])
            step = self.manifest.step
            data = b"".join(client.get(chunk_key(r, step, i)) for i in range(self._chunks[name]))
            if len(data) != info["size"] or not tag_mod.verify(self._tag_key, r, step, data, self._tags[name]):
                raise CheckpointCorruptError(
                    f"{self.where(name)}: {len(data)} bytes fail the copy's tag (expected {info['size']} bytes "
                    "tagged by the writer)\nHINT: the copy was changed on the way or in the holder; the disk "
                    "checkpoint is used instead"
                )
            self.peers.bytes_fetched += len(data)
            self._blobs[name] = data
        return self._blobs[name]

    def _read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        blob = self._blob(name)
        return (
            torch.frombuffer(bytearray(blob[start:stop]), dtype=torch.uint8)
            if stop > start
            else torch.empty(0, dtype=torch.uint8)
        )

    def state(self) -> dict:
        return state_mod.check(json.loads(json.dumps(self._state)), self.path)

    def verify_all(self) -> None:
        for name in self._rank_of:
            self._blob(name)

    def release(self) -> None:
        self._blobs.clear()


def maybe_peer_store(where: str, timeout: float) -> PeerStore | None:
    """A PeerStore when the launcher runs replica stores for this round, else None."""
    return PeerStore(where, timeout) if replica_addresses_from_env() else None

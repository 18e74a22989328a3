"""Peer replicas: every ``fault_tolerance.every`` steps each rank copies its state into the memory of
its own host's agent and of ``fault_tolerance.replicas`` other hosts' agents (``launcher`` replica
stores), off the step's critical path.

What a copy is: the checkpoint writer's safetensors bytes of the shards this rank writes in a disk
checkpoint (the same write plan, so a copy of every rank tiles the whole state, and the checkpoint
reader reshards it to any world size), its end-to-end tag (:mod:`disttrain.fault.tag`: one keyed
pass, which is also its checksum), and a JSON record (pieces, this rank's RNG, the tag; on rank 0
also the trainer's state and layout). Nothing is pickled.

Per copy, on each rank: at the step end the training thread records the shards (no copy, no
collective) and starts one background thread, which copies them into host memory (the snapshot;
the next optimizer step waits for it, so the copy is exactly the state at that step), tags them
once and hands them out. The own host's agent gets them without the network: the snapshot is taken
straight into a new file of that agent's private directory (``launcher.replica_store``), which the
agent adopts (maps, holds, unlinks); other hosts get bulk frames that neither side hashes (the
reader checks the tag before use). The record goes last: a copy without its record is incomplete
and never used.
If the previous copy is still being sent at the next copy step, the step waits for it (at most one
copy is behind, so a loss costs at most the step in flight; a copy slower than ``every`` steps shows
as step time: raise ``every``). A failed send is logged and the next copy retries; training never
stops for it (the disk checkpoint remains the fallback).

Keys in a replica store, per source rank ``r``: ``c/r/STEP/d/I`` (chunks), ``c/r/STEP/rec`` (the
record: the copy is complete), ``c/r/steps`` (JSON: the complete steps held, the newest two, so a
loss in the middle of a copy leaves the previous one of every rank).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import secrets
import threading
import time

import torch

from launcher import connect_replica, replica_addresses_from_env, replica_tag_key, shm_dir_from_env

from ..checkpoint import state as state_mod
from ..checkpoint.checkpointer import plan_writes, shard_signature
from ..checkpoint.writer import RankWrite, aligned_empty
from ..observe.callbacks import Callback
from . import tag as tag_mod

log = logging.getLogger(__name__)
CHUNK = 16 << 20  # bytes per value (the replica store refuses values over 32 MiB)
KEEP = 2  # complete copies a holder keeps per rank


def targets(node: int, nodes: int, replicas: int) -> list[int]:
    """The nodes holding node ``node``'s copies: itself, then the next ``replicas`` nodes (a ring)."""
    return sorted({(node + i) % nodes for i in range(min(replicas, nodes - 1) + 1)})


def chunk_key(rank: int, step: int, i: int) -> str:
    return f"c/{rank}/{step}/d/{i}"


def record_key(rank: int, step: int) -> str:
    return f"c/{rank}/{step}/rec"


def steps_key(rank: int) -> str:
    return f"c/{rank}/steps"


class _Copy:
    def __init__(self, job: RankWrite, record: dict):
        self.job, self.record = job, record
        self.snapshot = threading.Event()
        self.done = threading.Event()


class PeerReplicas(Callback):
    """Trainer callback (after the checkpointer). ``every``/``replicas``: the ``fault_tolerance`` section.
    Inactive unless the launcher runs replica stores (an elastic multi-node ``disttrain launch``)."""

    def __init__(self, every: int, replicas: int, comm, addresses: list[str] | None = None):
        self.every, self.replicas, self.comm = every, replicas, comm
        self.addresses = addresses if addresses is not None else replica_addresses_from_env()
        self.active = bool(every and self.addresses)
        self.rank, self.world = comm.rank, comm.world_size
        self.node = int(os.environ.get("GROUP_RANK", "0"))
        self._clients: dict[int, object] = {}
        self._plan: list[int] | None = None
        self._staging: torch.Tensor | None = None
        self._copy: _Copy | None = None
        self._held: dict[int, list[int]] = {}  # target node -> complete steps it holds of this rank
        self.shm_dir = shm_dir_from_env() if self.active else None  # own agent's directory (host-local copy)
        self._tag_key: bytes | None = None
        self.sent = self.waits = self.failed = 0
        self.sent_bytes = 0
        self.stall_s = 0.0  # time the training thread spent here (recording shards, waiting for a snapshot)

    # -- trainer hooks --------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        if self.active:
            self._group = self.comm.new_group(list(range(self.world)))
            self._tag_key = replica_tag_key()

    def on_step_end(self, trainer) -> None:
        if not self.active or trainer.step % self.every or trainer.step >= trainer.cfg.train.steps:
            return
        t0 = time.perf_counter()
        try:
            self._start_copy(trainer)
        finally:
            self.stall_s += time.perf_counter() - t0

    def _start_copy(self, trainer) -> None:
        shards = trainer.strategy.state_shards()
        if self._plan is None:  # once, every rank at the same step: the checkpoint's write plan
            from collectives.objects import allgather_bytes

            self._plan = plan_writes(shard_signature(shards), self.rank, lambda b: allgather_bytes(self._group, b))
        c = self._copy
        if c is not None and not c.done.is_set():  # back-pressure: at most one copy behind, so one step lost
            self.waits += 1
            if not c.done.wait(self.comm.timeout):
                raise TimeoutError(f"rank {self.comm.env.where}: the replica of step {c.job.step} never ended")
        job = RankWrite("memory", trainer.step, self.rank, [shards[i] for i in self._plan])
        shared = state_mod.capture(trainer) if self.rank == 0 else None
        if shared is not None:
            par = trainer.cfg.parallel
            shared["layout"] = {"strategy": par.strategy, "class": type(trainer.strategy).__name__}
        record = {"world": self.world, "local": {"rng": state_mod.capture_rng()}, "shared": shared}
        padded = -(-job.size // 4096) * 4096
        if not self.shm_dir and (self._staging is None or self._staging.numel() < padded):
            self._staging = None
            self._staging = aligned_empty(padded)
        self._copy = copy = _Copy(job, record)
        threading.Thread(target=self._send, args=(copy, self._staging), daemon=True, name="replica").start()

    def before_optimizer_step(self, trainer) -> None:
        c = self._copy
        if c is not None and not c.snapshot.is_set():
            t0 = time.perf_counter()
            if not c.snapshot.wait(self.comm.timeout):
                raise TimeoutError(f"rank {self.comm.env.where}: the replica snapshot of step {c.job.step} never ended")
            self.stall_s += time.perf_counter() - t0

    def on_train_end(self, trainer, summary: dict | None = None) -> None:
        self.close()
        if self.active and self.rank == 0:
            print(
                f"disttrain: peer replicas: {self.sent} copies ({self.sent_bytes / 2**20:.1f} MiB sent by rank 0), "
                f"{self.waits} waited for the previous one, {self.failed} failed sends; the "
                f"training thread spent {self.stall_s:.2f}s on them",
                flush=True,
            )

    def on_exception(self, trainer, exc: BaseException) -> None:
        self.close()

    def close(self) -> None:
        if self._copy is not None:
            self._copy.done.wait(self.comm.timeout)
        for c in self._clients.values():
            c.close()
        self._clients.clear()

    # -- the background thread -------------------------------------------------------------
    def _new_segment(self, size: int) -> tuple[str, torch.Tensor]:
        """A new file of ``size`` bytes in the own agent's private directory, mapped with its pages
        populated (the snapshot into it is a plain memcpy). Ours: created exclusively, never followed.
        Made at the snapshot, not ahead: a host killed between its creation and the agent's adoption
        (which removes the name) is the only way one is left in the directory."""
        name = f"r{self.rank}-{os.getpid()}-{secrets.token_hex(8)}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(os.path.join(self.shm_dir, name), flags, 0o600)
        try:
            os.ftruncate(fd, size)
            buf = torch.frombuffer(mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE), dtype=torch.uint8)
        finally:
            os.close(fd)
        return name, buf

    def _drop_segment(self, name: str) -> None:
        try:  # ours, not adopted (an adopted one has no name any more)
            os.unlink(os.path.join(self.shm_dir, name))
        except FileNotFoundError:
            pass

    def _send(self, copy: _Copy, staging: torch.Tensor | None) -> None:
        job = copy.job
        name = None
        try:
            try:
                if self.shm_dir:  # the snapshot goes straight into the own agent's segment
                    name, staging = self._new_segment(job.size)
                job.stage(staging)
            finally:
                copy.snapshot.set()
            data = memoryview(staging[: job.size].numpy())
            tag = tag_mod.sign(self._tag_key, self.rank, job.step, data)  # one pass: checksum and origin
            job.checksum = tag["tag"]
            rec = job.record(copy.record["local"])
            chunks = -(-job.size // CHUNK)
            rec.update(world=copy.record["world"], shared=copy.record["shared"], chunks=chunks, tag=tag)
            raw_rec = json.dumps(rec, separators=(",", ":")).encode()
            t0 = time.perf_counter()
            for node in targets(self.node, len(self.addresses), self.replicas):
                try:
                    if node == self.node and name is not None:
                        self._adopt_by(node, job.step, name, chunks, raw_rec)
                        name = None
                    else:
                        self._send_to(node, job.step, data, raw_rec)
                except Exception as exc:  # this holder misses this copy; the next one retries
                    self.failed += 1
                    self._clients.pop(node, None)
                    log.warning(
                        "rank %s: copying step %d to the replica store of node %d (%s) failed: %s",
                        self.comm.env.where,
                        job.step,
                        node,
                        self.addresses[node],
                        exc,
                    )
            self.sent += 1
            log.debug("rank %s: step %d copied in %.3fs", self.comm.env.where, job.step, time.perf_counter() - t0)
        except Exception as exc:
            self.failed += 1
            log.warning("rank %s: the replica of step %d failed: %s", self.comm.env.where, job.step, exc)
        finally:
            if name is not None:
                self._drop_segment(name)
            copy.snapshot.set()
            copy.done.set()

    def _client(self, node: int):
        client = self._clients.get(node)
        if client is None:
            client = self._clients[node] = connect_replica(self.addresses[node], timeout=self.comm.timeout)
        return client

    def _adopt_by(self, node: int, step: int, name: str, chunks: int, raw_rec: bytes) -> None:
        """The own agent maps the segment ``name`` as this copy's chunks (no bytes on a socket)."""
        client = self._client(node)
        client.adopt(name, CHUNK, [chunk_key(self.rank, step, i) for i in range(chunks)])
        self._commit(client, node, step, raw_rec, chunks)

    def _send_to(self, node: int, step: int, data: memoryview, raw_rec: bytes) -> None:
        client = self._client(node)
        for i, off in enumerate(range(0, max(len(data), 1), CHUNK)):
            client.set_bulk(chunk_key(self.rank, step, i), data[off : off + CHUNK])
        self._commit(client, node, step, raw_rec, -(-len(data) // CHUNK) or 1)
        self.sent_bytes += len(data)

    def _commit(self, client, node: int, step: int, raw_rec: bytes, chunks: int) -> None:
        """The record (the copy is complete), the holder's list of complete steps, then the oldest dropped."""
        r = self.rank
        client.set(record_key(r, step), raw_rec)  # last: the copy is complete
        held = [s for s in self._held.get(node, []) if s != step] + [step]
        keep, drop = held[-KEEP:], held[:-KEEP]
        client.set(steps_key(r), json.dumps(keep))
        self._held[node] = keep
        for s in drop:
            client.delete_key(record_key(r, s))  # first: a copy without its record is never used
            for i in range(chunks):
                client.delete_key(chunk_key(r, s, i))

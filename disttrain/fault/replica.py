"""Peer replicas: every ``fault_tolerance.every`` steps each rank copies its state into the memory of
its own host's agent and of ``fault_tolerance.replicas`` other hosts' agents (``launcher`` replica
stores), off the step's critical path.

What a copy is: the checkpoint writer's safetensors bytes of the shards this rank writes in a disk
checkpoint (the same write plan, so a copy of every rank tiles the whole state, and the checkpoint
reader reshards it to any world size), its xxh3 checksum, and a JSON record (pieces, this rank's
RNG; on rank 0 also the trainer's state and layout). Nothing is pickled.

Per copy, on each rank: at the step end the training thread records the shards (no copy, no
collective) and starts one background thread, which copies them into a reused host buffer (the
snapshot; the next optimizer step waits for it, so the copy is exactly the state at that step), then
hashes and sends them. The record goes last: a copy without its record is incomplete and never used.
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
import os
import threading
import time

import torch

from launcher import connect_replica, replica_addresses_from_env

from ..checkpoint import checksum
from ..checkpoint import state as state_mod
from ..checkpoint.checkpointer import plan_writes, shard_signature
from ..checkpoint.writer import RankWrite, aligned_empty
from ..observe.callbacks import Callback

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
        self.sent = self.waits = self.failed = 0
        self.sent_bytes = 0
        self.stall_s = 0.0  # time the training thread spent here (recording shards, waiting for a snapshot)

    # -- trainer hooks --------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        if self.active:
            self._group = self.comm.new_group(list(range(self.world)))

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
        if self._staging is None or self._staging.numel() < padded:
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
    def _send(self, copy: _Copy, staging: torch.Tensor) -> None:
        job = copy.job
        try:
            try:
                job.stage(staging)
            finally:
                copy.snapshot.set()
            data = memoryview(staging[: job.size].numpy())
            job.checksum = checksum.digest(data)
            rec = job.record(copy.record["local"])
            rec.update(world=copy.record["world"], shared=copy.record["shared"], chunks=-(-job.size // CHUNK))
            raw_rec = json.dumps(rec, separators=(",", ":")).encode()
            t0 = time.perf_counter()
            for node in targets(self.node, len(self.addresses), self.replicas):
                try:
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
            copy.snapshot.set()
            copy.done.set()

    def _send_to(self, node: int, step: int, data: memoryview, raw_rec: bytes) -> None:
        client = self._clients.get(node)
        if client is None:
            client = self._clients[node] = connect_replica(self.addresses[node], timeout=self.comm.timeout)
        r = self.rank
        for i, off in enumerate(range(0, max(len(data), 1), CHUNK)):
            client.set(chunk_key(r, step, i), data[off : off + CHUNK])
        client.set(record_key(r, step), raw_rec)  # last: the copy is complete
        held = [s for s in self._held.get(node, []) if s != step] + [step]
        keep, drop = held[-KEEP:], held[:-KEEP]
        client.set(steps_key(r), json.dumps(keep))
        self._held[node] = keep
        for s in drop:
            client.delete_key(record_key(r, s))  # first: a copy without its record is never used
            for i in range(-(-len(data) // CHUNK) or 1):
                client.delete_key(chunk_key(r, s, i))
        self.sent_bytes += len(data)

"""Peer replicas: every ``fault_tolerance.every`` steps each rank copies its state into the memory of
its own host's agent and of ``fault_tolerance.replicas`` other hosts' agents (``launcher`` replica
stores), off the step's critical path.

What a copy is: the checkpoint writer's safetensors bytes of the shards this rank writes in a disk
checkpoint (the same write plan, so a copy of every rank tiles the whole state, and the checkpoint
reader reshards it to any world size), its end-to-end tag (:mod:`disttrain.fault.tag`: one keyed
pass, which is also its checksum), and a JSON record (pieces, this rank's RNG, the tag; on rank 0
also the trainer's state and layout). Nothing is pickled.

Per copy, on each rank: at the step end the training thread records the shards, the trainer's
state and RNG (no copy, no collective) and queues them for the rank's copy thread (one for the run:
starting a thread per copy cost the step the thread's start), which lays out the file, copies the
shards into host memory (the snapshot; the next optimizer step waits for it, so the copy is
exactly the state at that step), tags them
once and hands them out. The own host's agent gets them without the network: the snapshot is taken
straight into a file of that agent's private directory (``launcher.replica_store``; one of
``KEEP + 1`` this rank reuses, never one whose copy the agent still lists), which the agent adopts
(maps and holds); other hosts get bulk frames that neither side hashes (the
reader checks the tag before use). The record goes last: a copy without its record is incomplete
and never used.
If the previous copy is still being sent at the next copy step, the step waits for it (at most one
copy is behind, so a loss costs at most the step in flight; a copy slower than ``every`` steps shows
as step time: raise ``every``). A failed send is logged and the next copy retries; training never
stops for it (the disk checkpoint remains the fallback).

Keys in a replica store, per source rank ``r``: ``c/r/STEP/d/I`` (chunks), ``c/r/STEP/rec`` (the
record: the copy is complete), ``c/r/steps`` (JSON: the complete steps held, the newest two, so a
loss in the middle of a copy leaves the previous one of every rank).

After a change of world the holders still hold the older rounds' copies: a rank's own older copies
count among its two (taken from ``c/r/steps`` at its first copy to that holder) and go as new ones
complete; the copies of ranks the new world no longer has are pruned by rank 0 once every rank of
the new world has a complete copy somewhere (until then they may still be the newest complete set).
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import queue
import secrets
import threading
import time

import torch

from launcher import connect_replica, replica_addresses_from_env, replica_tag_key, shm_dir_from_env

from ..checkpoint import state as state_mod
from ..checkpoint.write_plan import shard_signature
from ..checkpoint.writer import RankWrite, aligned_empty
from ..observe.callbacks import Callback
from . import tag as tag_mod
from .plan import copy_plan

log = logging.getLogger(__name__)
CHUNK = 16 << 20  # bytes per value (the replica store refuses values over 32 MiB)
KEEP = 2  # complete copies a holder keeps per rank
SMALL = 64 << 10  # a copy this small goes in the same request as its record (a plain value, MAC'd)
AUTO_WARM, AUTO_COPIES = 6, 5  # every=auto: steps timed without copies, then with a copy each


def targets(node: int, nodes: int, replicas: int) -> list[int]:
    """The nodes holding node ``node``'s copies: itself, then the next ``replicas`` nodes (a ring)."""
    return sorted({(node + i) % nodes for i in range(min(replicas, nodes - 1) + 1)})


def aligned_every(k: int, disk_every: int) -> int:
    """every=auto's k against ``checkpoint.every``: the smallest divisor of the disk interval that is at
    least ``k`` (the interval itself when k exceeds it), so every disk checkpoint's step also gets a copy
    and the newest copy is never older than the newest disk checkpoint; ``k`` when there is none."""
    if disk_every <= 0:
        return k
    return next((d for d in range(k, disk_every + 1) if disk_every % d == 0), disk_every)


def chunk_key(rank: int, step: int, i: int) -> str:
    return f"c/{rank}/{step}/d/{i}"


def record_key(rank: int, step: int) -> str:
    return f"c/{rank}/{step}/rec"


def steps_key(rank: int) -> str:
    return f"c/{rank}/steps"


class _Copy:
    """One step's copy: ``local`` (the own host's, with the host-local boxes) and ``remote`` (other
    hosts'), the same list when the rank keeps no host-local box (:mod:`disttrain.fault.plan`)."""

    def __init__(self, step: int, remote: list, local: list, record: dict):
        self.step, self.remote, self.local, self.record = step, remote, local, record
        self.snapshot = threading.Event()
        self.done = threading.Event()


class PeerReplicas(Callback):
    """Trainer callback (after the checkpointer). ``every``/``replicas``: the ``fault_tolerance`` section.
    Inactive unless the launcher runs replica stores (an elastic multi-node ``disttrain launch``)."""

    def __init__(self, every: int | str, replicas: int, comm, addresses: list[str] | None = None, target: float = 0.03):
        self.auto = every == "auto"  # measure, then pick (``_choose_every``)
        self.every, self.replicas, self.comm, self.target = 1 if self.auto else int(every), replicas, comm, target
        self.addresses = addresses if addresses is not None else replica_addresses_from_env()
        self.active = bool(self.every and self.addresses)
        self.rank, self.world = comm.rank, comm.world_size
        self.node = int(os.environ.get("GROUP_RANK", "0"))
        self._clients: dict[int, object] = {}
        self._plan: list[int] | None = None  # indices of the shards every holder gets
        self._extra: list[int] = []  # indices of the host-local boxes only the own host's agent gets
        self._tensors: list[str] = []  # every tensor of the state (each record names them)
        self._copy: _Copy | None = None
        self._queue: queue.SimpleQueue[_Copy | None] = queue.SimpleQueue()  # copies for the copy thread
        self._thread: threading.Thread | None = None  # the copy thread, started at the first copy
        # staging buffers (no agent directory; the remote part beside a local one) -> (buffer, its views)
        self._buffers: dict[str, tuple[torch.Tensor, dict]] = {}
        self._static: dict = {}  # rank 0: the parts of the trainer's state that a round never changes
        self._held: dict[int, list[int]] = {}  # target node -> complete steps it holds of this rank
        self.shm_dir = shm_dir_from_env() if self.active else None  # own agent's directory (host-local copy)
        self._tag_key: bytes | None = None
        # own-host segment files: name -> [mapped buffer, step it holds or None, its views (RankWrite.stage)]
        self._slots: dict[str, list] = {}
        self._old_world: int | None = None  # the largest world of earlier rounds' copies (rank 0; None: not read)
        self._first_step: int | None = None  # this process's first copy
        self.pruned_bytes: int | None = None
        self._step_ends: list[float] = []  # every=auto: step-end times before any copy
        self._copy_ends: list[float] = []  # every=auto: step-end times while copying at every step
        self.sent = self.waits = self.failed = 0
        self.sent_bytes = 0
        self.stall_s = 0.0  # time the training thread spent here (recording shards, waiting for a snapshot)
        self.copy_cpu_s = 0.0  # CPU time of the copy threads (snapshot, tag, sends)
        self._cpu0: tuple[float, float] | None = None  # (process, training thread) CPU time at the first copy

    # -- trainer hooks --------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        if self.active:
            self._group = self.comm.new_group(list(range(self.world)))
            self._tag_key = replica_tag_key()

    def on_step_end(self, trainer) -> None:
        if not self.active or trainer.step >= trainer.cfg.train.steps:
            return
        if self.auto and not self._auto_copy(trainer.step, trainer.cfg.checkpoint.every):
            return
        if trainer.step % self.every:
            return
        t0 = time.perf_counter()
        try:
            self._start_copy(trainer)
        finally:
            self.stall_s += time.perf_counter() - t0

    def _start_copy(self, trainer) -> None:
        shards = trainer.strategy.state_shards()
        if self._plan is None:  # once, every rank at the same step: what goes where (disttrain.fault.plan)
            from collectives.objects import allgather_bytes

            mine = json.dumps({"sig": shard_signature(shards), "node": self.node}).encode()
            everyone = [json.loads(b) for b in allgather_bytes(self._group, mine)]
            sigs, nodes = [e["sig"] for e in everyone], [int(e["node"]) for e in everyone]
            self._plan, self._extra = copy_plan(sigs, nodes, self.rank, len(self.addresses), self.replicas)
            self._tensors = sorted({e[0] for sig in sigs for e in sig})  # so recovery sees a tensor none has
        c = self._copy
        if c is not None and not c.done.is_set():  # back-pressure: at most one copy behind, so one step lost
            self.waits += 1
            if not c.done.wait(self.comm.timeout):
                raise TimeoutError(f"rank {self.comm.env.where}: the replica of step {c.step} never ended")
        shared = state_mod.capture(trainer, self._static) if self.rank == 0 else None
        if shared is not None:
            par = trainer.cfg.parallel
            shared["layout"] = {"strategy": par.strategy, "class": type(trainer.strategy).__name__}
        record = {"world": self.world, "local": {"rng": state_mod.capture_rng()}, "shared": shared}
        # what the step end must fix (which tensors, the trainer's state and RNG) is taken here; the
        # file's layout, the snapshot and the rest are the copy thread's
        remote = [shards[i] for i in self._plan]
        local = [shards[i] for i in sorted(self._plan + self._extra)] if self._extra else remote
        self._copy = copy = _Copy(trainer.step, remote, local, record)
        if self._thread is None:  # one thread for the run: a new one per copy costs the step its start
            self._thread = threading.Thread(target=self._run, daemon=True, name="replica")
            self._thread.start()
        self._queue.put(copy)

    def _auto_copy(self, step: int, disk_every: int) -> bool:
        """every=auto: ``AUTO_WARM`` steps without copies, then ``AUTO_COPIES`` steps with a copy each,
        their step-end times kept; then :meth:`_choose_every`. Counted in calls, so every rank agrees."""
        now = time.perf_counter()
        if len(self._step_ends) < AUTO_WARM:
            self._step_ends.append(now)
            return False
        self._copy_ends.append(now)
        if len(self._copy_ends) <= AUTO_COPIES:
            return True
        self._choose_every(step, disk_every)
        return True

    def _choose_every(self, step: int, disk_every: int = 0) -> None:
        """All ranks at the same step: the cost of a copy is what it added to a step (median step with a
        copy each minus median step without: that counts its CPU, its waits and whatever it contends
        for); k is the smallest with cost / (k x step) under ``target``; the largest k of any rank wins
        (copies must be at the same steps). Measured once per process, over a few steps: noisy."""
        from collectives.objects import allgather_bytes

        def median_interval(ends: list[float]) -> float:
            gaps = sorted(b - a for a, b in zip(ends, ends[1:]))
            return gaps[(len(gaps) - 1) // 2]

        step_s = median_interval(self._step_ends)
        cost_s = max(0.0, median_interval(self._copy_ends) - step_s)
        k = max(1, math.ceil(cost_s / (self.target * max(step_s, 1e-6))))
        k = max(int(b) for b in allgather_bytes(self._group, str(k).encode()))
        k, capped = aligned_every(k, disk_every), k
        self.auto, self.every = False, k
        note = f" (not {capped}: copies stay at least as new as the disk checkpoint)" if k != capped else ""
        msg = (
            f"fault_tolerance.every=auto: a copy adds {cost_s * 1e3:.1f} ms to a {step_s * 1e3:.1f} ms step "
            f"(rank {self.rank}): copies every {k} step(s){note} from step {step} (about "
            f"{cost_s / (k * step_s) * 100:.1f}% of step time here; a lost host costs up to {k} step(s))"
        )
        log.info("rank %s: %s", self.comm.env.where, msg)
        if self.rank == 0:
            print(f"disttrain: {msg}", flush=True)

    def before_optimizer_step(self, trainer) -> None:
        c = self._copy
        if c is not None and not c.snapshot.is_set():
            t0 = time.perf_counter()
            if not c.snapshot.wait(self.comm.timeout):
                raise TimeoutError(f"rank {self.comm.env.where}: the replica snapshot of step {c.step} never ended")
            self.stall_s += time.perf_counter() - t0

    def on_train_end(self, trainer, summary: dict | None = None) -> None:
        self.close()
        if self.active and self.rank == 0:
            print(
                f"disttrain: peer replicas: {self.sent} copies ({self.sent_bytes / 2**20:.1f} MiB sent by rank 0), "
                f"{self.waits} waited for the previous one, {self.failed} failed sends; the "
                f"training thread spent {self.stall_s:.2f}s on them, the copy threads {self.copy_cpu_s:.3f}s of CPU",
                flush=True,
            )

    def on_exception(self, trainer, exc: BaseException) -> None:
        self.close()

    def close(self) -> None:
        """This rank, at the end (or on an error): the copy in flight ends first, its thread joined, so
        no thread of ours that runs torch ops is alive when the process leaves (a daemon thread inside a
        native call at the interpreter's exit aborts the process)."""
        thread, last = self._thread, self._copy
        if thread is not None:
            self._queue.put(None)  # after the copy in flight, the thread ends
            thread.join(self.comm.timeout)
            self._thread = None
            if thread.is_alive() and last is not None:
                log.warning(
                    "rank %s: the replica of step %d still runs after %gs; leaving without it",
                    self.comm.env.where,
                    last.step,
                    self.comm.timeout,
                )
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        for name in list(self._slots):  # the agent's mappings keep the copies; the names go
            self._drop_segment(name)
        self._slots.clear()

    # -- the background thread -------------------------------------------------------------
    def _segment_for(self, size: int) -> tuple[str, torch.Tensor, dict]:
        """The own-host file for the next snapshot: one of ours whose copy the agent no longer lists
        (rewriting it changes nothing anyone will read), else a new one (at most ``KEEP + 1`` exist)."""
        held = set(self._held.get(self.node, []))
        for name, (buf, step, views) in list(self._slots.items()):
            if step is None or step not in held:
                if buf.numel() == size:
                    self._slots[name][1] = None
                    return name, buf, views
                del self._slots[name]
                self._drop_segment(name)
        name, buf = self._new_segment(size)
        self._slots[name] = [buf, None, {}]
        return name, buf, self._slots[name][2]

    def _new_segment(self, size: int) -> tuple[str, torch.Tensor]:
        """A new file of ``size`` bytes in the own agent's private directory, mapped with its pages
        populated (the snapshot into it is a plain memcpy). Ours: created exclusively, never followed."""
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
        try:  # ours; an adopted copy lives on in the agent's mapping
            os.unlink(os.path.join(self.shm_dir, name))
        except FileNotFoundError:
            pass

    def _run(self) -> None:
        """The copy thread: the copies ``_start_copy`` queues, one at a time, until ``close``'s None."""
        while (copy := self._queue.get()) is not None:
            self._send(copy)

    def _buffer(self, which: str, size: int) -> tuple[torch.Tensor, dict]:
        """The copy thread's own staging buffer ``which`` of at least ``size`` bytes, with its views."""
        buf = self._buffers.get(which)
        if buf is None or buf[0].numel() < size:
            self._buffers.pop(which, None)
            buf = self._buffers[which] = (aligned_empty(-(-size // 4096) * 4096), {})
        return buf

    def _send(self, copy: _Copy) -> None:
        name = None
        cpu0 = time.thread_time()
        try:
            try:
                local = RankWrite("memory", copy.step, self.rank, copy.local)
                if self.shm_dir:  # the snapshot goes straight into the own agent's segment
                    name, staging, views = self._segment_for(local.size)
                else:  # no agent directory (a test's stores)
                    staging, views = self._buffer("local", local.size)
                local.stage(staging, views)
                parts = {"local": (local, staging)}
                nodes = targets(self.node, len(self.addresses), self.replicas)
                if copy.remote is not copy.local and len(nodes) > 1:  # other hosts get it without the extra boxes
                    remote = RankWrite("memory", copy.step, self.rank, copy.remote)
                    rstaging, rviews = self._buffer("remote", remote.size)
                    remote.stage(rstaging, rviews)
                    parts["remote"] = (remote, rstaging)
            finally:
                copy.snapshot.set()
            sealed = {which: self._seal(copy, job, buf) for which, (job, buf) in parts.items()}
            sealed.setdefault("remote", sealed["local"])
            t0 = time.perf_counter()
            for node in nodes:
                data, raw_rec, chunks = sealed["local" if node == self.node else "remote"]
                try:
                    if node == self.node and name is not None:
                        self._adopt_by(node, copy.step, name, chunks, raw_rec)
                        self._slots[name][1] = copy.step
                    else:
                        self._send_to(node, copy.step, data, raw_rec)
                except Exception as exc:  # this holder misses this copy; the next one retries
                    self.failed += 1
                    self._clients.pop(node, None)
                    log.warning(
                        "rank %s: copying step %d to the replica store of node %d (%s) failed: %s",
                        self.comm.env.where,
                        copy.step,
                        node,
                        self.addresses[node],
                        exc,
                    )
            self.sent += 1
            if self.rank == 0 and self.pruned_bytes is None:
                self._maybe_prune(copy.step)
            log.debug("rank %s: step %d copied in %.3fs", self.comm.env.where, copy.step, time.perf_counter() - t0)
        except Exception as exc:
            self.failed += 1
            log.warning("rank %s: the replica of step %d failed: %s", self.comm.env.where, copy.step, exc)
        finally:
            self.copy_cpu_s += time.thread_time() - cpu0
            copy.snapshot.set()
            copy.done.set()

    def _seal(self, copy: _Copy, job: RankWrite, staging: torch.Tensor) -> tuple[memoryview, bytes, int]:
        """A staged file's bytes, its record (with its tag: one pass, checksum and origin) and chunk count."""
        data = memoryview(staging[: job.size].numpy())
        tag = tag_mod.sign(self._tag_key, self.rank, job.step, data)
        job.checksum = tag["tag"]
        rec = job.record(copy.record["local"])
        chunks = -(-job.size // CHUNK)
        rec.update(world=copy.record["world"], shared=copy.record["shared"], chunks=chunks, tag=tag)
        rec["tensors"] = self._tensors
        return data, json.dumps(rec, separators=(",", ":")).encode(), chunks

    def _client(self, node: int):
        client = self._clients.get(node)
        if client is None:
            client = self._clients[node] = connect_replica(self.addresses[node], timeout=self.comm.timeout)
        return client

    def _adopt_by(self, node: int, step: int, name: str, chunks: int, raw_rec: bytes) -> None:
        """The own agent maps the segment ``name`` as this copy's chunks (no bytes on a socket)."""
        client = self._client(node)
        client.adopt(name, CHUNK, [chunk_key(self.rank, step, i) for i in range(chunks)])
        self._commit(client, node, step, raw_rec)

    def _send_to(self, node: int, step: int, data: memoryview, raw_rec: bytes) -> None:
        client = self._client(node)
        if len(data) <= SMALL:  # a header only (ddp: disttrain.fault.plan): with the record, one request
            self._commit(client, node, step, raw_rec, [(chunk_key(self.rank, step, 0), bytes(data))])
        else:
            for i, off in enumerate(range(0, max(len(data), 1), CHUNK)):
                client.set_bulk(chunk_key(self.rank, step, i), data[off : off + CHUNK])
            self._commit(client, node, step, raw_rec)
        self.sent_bytes += len(data)

    def _commit(self, client, node: int, step: int, raw_rec: bytes, first: list | None = None) -> None:
        """The record (the copy is complete), the holder's list of complete steps, then the oldest dropped
        (record and chunks at once); ``first``: (key, value) pairs set in the same request, before them.
        The first time, the list starts from what the holder already lists: this rank's copies of an
        earlier round, dropped as new ones complete."""
        r = self.rank
        if node not in self._held:
            self._held[node] = json.loads(client.get(steps_key(r))) if client.check([steps_key(r)]) else []
        held = [s for s in self._held[node] if s != step] + [step]
        keep, drop = held[-KEEP:], held[:-KEEP]
        # one request, the record first: the copy is complete, and listed, at once
        pairs = [*(first or ()), (record_key(r, step), raw_rec), (steps_key(r), json.dumps(keep))]
        client.multi_set([k for k, _ in pairs], [v for _, v in pairs])
        self._held[node] = keep
        if drop:
            client.prune([f"c/{r}/{s}/" for s in drop])

    def _has_copy_of_this_world(self, node: int, r: int) -> bool:
        c = self._client(node)
        steps = json.loads(c.get(steps_key(r))) if c.check([steps_key(r)]) else []
        return any(
            s >= self._first_step
            and c.check([record_key(r, s)])
            and int(json.loads(c.get(record_key(r, s)))["world"]) == self.world
            for s in steps
        )

    def _maybe_prune(self, step: int) -> None:
        """Rank 0, after each of its copies until it is done once: when every rank of this world has a
        complete copy of this round on some holder, free the copies of ranks beyond this world
        (an earlier, larger world's) on every holder, and say how many bytes that freed."""
        holders = range(len(self.addresses))
        if self._first_step is None:
            self._first_step, worlds = step, [self.world]
            for node in holders:  # earlier rounds' copies of rank 0 say how large their world was
                c = self._client(node)
                for s in json.loads(c.get(steps_key(0))) if c.check([steps_key(0)]) else []:
                    if c.check([record_key(0, s)]):
                        worlds.append(int(json.loads(c.get(record_key(0, s)))["world"]))
            self._old_world = max(worlds)
        if self._old_world <= self.world:
            self.pruned_bytes = 0
            return
        for r in range(self.world):
            if not any(self._has_copy_of_this_world(n, r) for n in holders):
                return  # rank r has no complete copy of this round yet: the old ones may still be needed
        gone = [f"c/{r}/" for r in range(self.world, self._old_world)]
        freed, left = 0, []
        for n in holders:
            f, h = self._client(n).prune(gone)
            freed, left = freed + f, left + [h]
        self.pruned_bytes = freed
        print(
            f"disttrain: peer replicas: freed {freed} bytes of copies of ranks {self.world}..{self._old_world - 1} "
            f"(world {self._old_world} -> {self.world}) at step {step}; holders now hold {left} bytes",
            flush=True,
        )

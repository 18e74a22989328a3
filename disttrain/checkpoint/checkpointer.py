"""The trainer callback: resume from the newest checkpoint that verifies, save every N steps
(asynchronously by default), on a stop request (preemption: synchronously, before exit) and
at the end.

Who calls what: every rank runs the same hooks at the same steps (``Trainer.callbacks``).
Checkpoint collectives run on their own group, and only from the training thread at step
boundaries, in the same order on every rank, so they cannot interleave with training
collectives or deadlock against them. Background threads never communicate.

Async save, per rank: ``save()`` records which tensors to write and starts a thread that
copies them into a reused, aligned host buffer (the snapshot), then writes, hashes and
fsyncs the file. The snapshot overlaps the next forward/backward; the next optimizer step
waits for it (``before_optimizer_step``), so the saved state is exactly the state at the save step. Each later step end
polls (one tiny allreduce) until every rank has written; then the ranks gather their
records and rank 0 commits in the background (manifest, rename, ``latest``, prune). At most
one save is in flight; a failed background write raises on every rank at the next step,
naming the failed rank.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import threading
import time
from typing import TYPE_CHECKING, Protocol

import torch

from collectives import ReduceOp
from collectives.objects import allgather_bytes

from ..observe.callbacks import Callback
from . import retention, testhooks
from . import state as state_mod
from .errors import CheckpointCorruptError, CheckpointError, CheckpointMismatchError
from .reader import STEP_DIR, CheckpointReader, resolve, step_dir_name
from .write_plan import plan_writes, shard_signature
from .writer import RankWrite, aligned_empty, clean_temporaries, commit, tmp_dir

if TYPE_CHECKING:
    from ..config.checkpoint import CheckpointConfig

log = logging.getLogger(__name__)


class LoadOutcome(enum.IntEnum):
    """What one rank found loading a checkpoint in resume(); the ranks agree on the worst (MAX)."""

    OK = 0
    CORRUPT = 1  # failed verification: an older checkpoint may load (checkpoint.fallback)
    MISMATCH = 2  # does not fit this run (or anything unexpected): falling back would not help


WRITING, WRITTEN, FAILED = 0, 1, 2
MEMORY = "peer memory"  # resume()'s candidate for the peers' in-memory copy


class PeerCopies(Protocol):
    """Copies of every rank's state in peers' memory (``disttrain.fault``): resume() prefers the newest
    complete one to the disk when it is at least as new, and falls back to the disk when it fails."""

    bytes_fetched: int  # bytes of copies this rank has read from the peers

    def newest(self) -> dict | None:
        """Rank 0 only: a JSON plan of the newest complete, verified copy (``{"step": ...}``), or None."""
        ...

    def reader(self, plan: dict) -> CheckpointReader:
        """Every rank: a reader serving ``plan``'s copy (fetched from the peers as pieces are asked for)."""
        ...


class _InFlight:
    def __init__(self, job: RankWrite, local: dict, shared: dict | None, periodic: bool = False, previous: int = -1):
        self.job, self.local, self.shared = job, local, shared
        self.periodic, self.previous = periodic, previous  # a periodic save may fail; the run goes on
        self.snapshot = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.started = time.perf_counter()


class Checkpointer(Callback):
    """Trainer callback. ``cfg`` is the ``checkpoint`` config section; the directory is
    ``<run dir>/checkpoints`` (inactive when the trainer has no run directory)."""

    def __init__(self, cfg: CheckpointConfig, comm):
        self.cfg, self.comm = cfg, comm
        self.rank, self.world = comm.rank, comm.world_size
        self.active = False
        self.dir: str | None = None
        self.group = None
        self.last_saved = -1
        self.resumed_from: int | None = None  # the step this run loaded; kept by pruning
        self._protected: set[int] = set()  # steps pruning keeps (the best checkpoint)
        self.stall_s = 0.0  # time the training thread spent blocked by saves (snapshot gate included)
        self._plan: tuple | None = None
        self._staging: torch.Tensor | None = None
        self._inflight: _InFlight | None = None
        self._commit_thread: threading.Thread | None = None
        self._commit_error: BaseException | None = None
        self.peers: PeerCopies | None = None  # set by disttrain.fault when fault_tolerance is on
        self.resumed_source: str | None = None  # MEMORY or the checkpoint directory resume() loaded
        self.memory_skipped: str | None = None  # why resume() read the disk although peers keep copies

    # -- trainer hooks --------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        if not self.cfg.enabled or trainer.run_dir is None:
            return
        self.attach(trainer, os.path.join(trainer.run_dir.path, "checkpoints"))
        restarts = os.environ.get("DISTTRAIN_RESTART_COUNT") or os.environ.get("TORCHELASTIC_RESTART_COUNT")
        step = self.resume(trainer)
        if step is not None and self.rank == 0:
            extra = f" (restart {restarts})" if restarts and restarts != "0" else ""
            if self.resumed_source == MEMORY:
                got = self.peers.bytes_fetched
                print(f"disttrain: resumed from {MEMORY} at step {step} ({got} bytes), 0 from disk{extra}", flush=True)
            else:
                why = f"; {self.memory_skipped}" if self.memory_skipped else ""
                print(f"disttrain: resumed from {self.dir}/step_{step:06d}{extra}{why}", flush=True)

    def on_step_end(self, trainer) -> None:
        testhooks.fire("step_end", self.rank, trainer.step)
        if not self.active:
            return
        self._raise_commit_error()
        self._poll(block=False)
        steps = trainer.cfg.train.steps
        if trainer.stop_requested:
            if trainer.step != self.last_saved:
                self.save(trainer, sync=True)
        elif self.cfg.every and trainer.step % self.cfg.every == 0 and trainer.step < steps:
            self.save(trainer, sync=not self.cfg.async_save, periodic=True)

    def before_optimizer_step(self, trainer) -> None:
        self._wait_snapshot()

    def on_train_end(self, trainer, summary: dict | None = None) -> None:
        if not self.active:
            return
        if trainer.step != self.last_saved:
            self.save(trainer, sync=True)
        self.wait()

    # -- public API -----------------------------------------------------------------------
    def attach(self, trainer, ckpt_dir: str) -> None:
        """All ranks: set the directory and create the checkpoint group. Optimizer steps wait for a
        snapshot in flight when this checkpointer is one of ``trainer.callbacks``."""
        self.active, self.dir = True, os.path.abspath(ckpt_dir)
        self.group = self.comm.new_group(list(range(self.world)))
        if self.rank == 0:
            os.makedirs(self.dir, exist_ok=True)
            clean_temporaries(self.dir)

    def step_path(self, step: int) -> str:
        return os.path.join(self.dir, step_dir_name(step))

    def protect(self, step: int) -> None:
        """Keep checkpoint ``step`` out of pruning (every rank calls it alike; rank 0 prunes)."""
        self._protected.add(step)

    def unprotect(self, step: int) -> None:
        self._protected.discard(step)

    def broadcast_json(self, obj):
        """All ranks: rank 0's JSON-serialisable ``obj`` on every rank."""
        return self._bcast_json(obj)

    def save(self, trainer, sync: bool = True, periodic: bool = False) -> None:
        """All ranks, same step. Sync: returns once the checkpoint is committed. Async: returns
        after recording what to write; the bytes are copied and written in the background.
        A ``periodic`` save that fails (a full disk, permissions) is logged and skipped: the
        previous checkpoint stays the resume point, training goes on, the next save retries.
        Any other failed save raises on every rank."""
        t0 = time.perf_counter()
        self._poll(block=True)
        self._join_commit()
        shards = trainer.strategy.state_shards()
        mine = self._plan_for(shards)
        job = RankWrite(self.dir, trainer.step, self.rank, [shards[i] for i in mine])
        local = {"rng": state_mod.capture_rng(), "untrained": state_mod.untrained_names(trainer.model)}
        shared = state_mod.capture(trainer) if self.rank == 0 else None
        shared = self._with_layout(trainer, shared)
        flight = _InFlight(job, local, shared, periodic, self.last_saved)
        if sync:
            try:
                job.write_live()
            except Exception as exc:  # reported collectively below
                flight.error = exc
            flight.snapshot.set()
            flight.done.set()
            self._inflight = flight
            self._poll(block=True, sync=True)
        else:
            padded = -(-job.size // 4096) * 4096
            if self._staging is None or self._staging.numel() < padded:
                self._staging = None
                self._staging = aligned_empty(padded)
            self._inflight = flight
            threading.Thread(
                target=self._background, args=(flight, self._staging), daemon=True, name=f"ckpt-step{trainer.step}"
            ).start()
        self.last_saved = trainer.step
        self.stall_s += time.perf_counter() - t0
        trainer.notify_checkpoint(trainer.step, self.step_path(trainer.step))

    def wait(self) -> None:
        """All ranks: finish the save in flight and its commit."""
        t0 = time.perf_counter()
        self._poll(block=True)
        self._join_commit()
        self.stall_s += time.perf_counter() - t0

    def resume(self, trainer) -> int | None:
        """All ranks: load the newest checkpoint that verifies (older ones on failure, with a
        warning, when ``fallback``); returns its step or None when there is none."""
        cands = self._bcast_json(resolve(self.dir) if self.rank == 0 else None)
        plan = None
        if self.peers is not None:  # the peers' copy first when it is at least as new as the disk's
            found = [self.peers.newest(), self.peers.missing] if self.rank == 0 else None
            plan, missing = self._bcast_json(found)
            disk = int(STEP_DIR.match(os.path.basename(cands[0])).group(1)) if cands else -1
            if plan is not None and plan["step"] >= disk:
                cands = [MEMORY, *cands]
            elif plan is None and missing is not None and not cands:  # the job trained: never restart at 0
                what = f"the copy of rank {missing[1]}" if missing[1] >= 0 else "the host-local boxes"
                raise CheckpointError(
                    f"rank {self.comm.env.where}: no complete copy in peer memory ({what} "
                    f"at step {missing[0]} was held only by lost hosts) and {self.dir} holds no checkpoint\n"
                    "HINT: raise fault_tolerance.replicas (hosts that may be lost at once), or set "
                    "checkpoint.every so a disk checkpoint backs the copies in memory"
                )
            elif plan is None:  # a requeued job's new agents, or every holder of a copy lost
                self.memory_skipped = "no complete copy in peer memory"
            else:
                self.memory_skipped = f"the copy in peer memory (step {plan['step']}) is older"
        for i, path in enumerate(cands):
            code, err = LoadOutcome.OK, None
            reader = None
            try:
                if path == MEMORY:
                    reader = self.peers.reader(plan)
                else:
                    reader = CheckpointReader(path, verify=self.cfg.verify_on_load)
                saved = reader.state()
                trainer.strategy.load_state_shards(reader)
            except CheckpointCorruptError as exc:
                code, err = LoadOutcome.CORRUPT, exc
            except Exception as exc:  # mismatch or anything unexpected: falling back would not help
                code, err = LoadOutcome.MISMATCH, exc
            finally:
                if reader is not None:
                    reader.release()
            flags = self._agree(code)
            if not any(flags):
                state_mod.apply(trainer, saved, saved.get("rng") or [])
                self.last_saved = trainer.step
                self.resumed_from = reader.step  # pruning never removes it (retention.prune)
                self.resumed_source = path
                return trainer.step
            bad = [r for r, f in enumerate(flags) if f]
            if err is not None:
                log.error("rank %s: loading %s failed: %s", self.comm.env.where, path, err)
            if path == MEMORY:  # whatever went wrong there, the disk is the fallback
                self.memory_skipped = "the copy in peer memory did not load"
                continue
            if max(flags) == LoadOutcome.MISMATCH:
                raise CheckpointMismatchError(
                    f"rank {self.comm.env.where}: {path} does not load on ranks {bad}: {err or 'see their logs'}"
                ) from err
            if not self.cfg.fallback or i == len(cands) - 1:
                raise CheckpointCorruptError(
                    f"rank {self.comm.env.where}: {path} failed verification on ranks "
                    f"{bad}: {err or 'see their logs'}"
                    + (
                        ""
                        if self.cfg.fallback
                        else "\nHINT: checkpoint.fallback=true loads the newest one that verifies"
                    )
                )
            if self.rank == 0 or err is not None:
                log.warning(
                    "rank %s: checkpoint %s failed verification on ranks %s; falling back to %s",
                    self.comm.env.where,
                    path,
                    bad,
                    cands[i + 1],
                )
            if self.rank == 0 and path != MEMORY:  # out of the count and out of the way, kept for a post-mortem
                retention.set_aside(path)
        if cands == [MEMORY]:  # the job had trained: starting again from step 0 would be a silent restart
            raise CheckpointError(
                f"rank {self.comm.env.where}: the peers' copy of step {plan['step']} did not load (see the errors "
                f"above) and {self.dir} holds no checkpoint\nHINT: set checkpoint.every so a disk checkpoint "
                "backs the copies in memory"
            )
        return None

    # -- internals ------------------------------------------------------------------------
    def _with_layout(self, trainer, shared):
        if shared is not None:
            par = trainer.cfg.parallel
            shared["layout"] = {
                "strategy": par.strategy,
                "class": type(trainer.strategy).__name__,
                "world_size": self.world,
                "mesh": getattr(par, "mesh", None) and par.mesh.model_dump(mode="json"),
            }
        return shared

    def _background(self, flight: _InFlight, staging: torch.Tensor) -> None:
        try:
            try:
                flight.job.stage(staging)
            finally:
                flight.snapshot.set()
            flight.job.write_staged(staging)
        except BaseException as exc:  # surfaces on the next step
            flight.error = exc
        finally:
            flight.done.set()

    def _wait_snapshot(self) -> None:
        f = self._inflight
        if f is None or f.snapshot.is_set():
            return
        t0 = time.perf_counter()
        if not f.snapshot.wait(self.comm.timeout):
            raise CheckpointError(
                f"rank {self.comm.env.where}: the snapshot of step {f.job.step} did not finish "
                f"within {self.comm.timeout:g}s"
            )
        self.stall_s += time.perf_counter() - t0

    def _poll(self, block: bool, sync: bool = False) -> None:
        f = self._inflight
        if f is None:
            return
        while True:
            mine = FAILED if f.error is not None else WRITTEN if f.done.is_set() else WRITING
            flags = self._agree(mine)
            if FAILED in flags:
                self._inflight = None
                bad = [r for r, s in enumerate(flags) if s == FAILED]
                why = f": {type(f.error).__name__}: {f.error}" if f.error is not None else "; see their logs"
                if f.periodic:
                    self._skip_failed(f, f"on rank(s) {bad}{why}")
                    return
                raise CheckpointError(
                    f"rank {self.comm.env.where}: saving checkpoint step {f.job.step} failed on "
                    f"rank(s) {bad}{why}\nHINT: check free space and permissions of {self.dir}"
                )
            if all(s == WRITTEN for s in flags):
                break
            if not block:
                return
            if mine == WRITING:
                if not f.done.wait(max(0.0, f.started + self.comm.timeout - time.perf_counter())):
                    raise CheckpointError(
                        f"rank {self.comm.env.where}: writing checkpoint step {f.job.step} did not finish within "
                        f"{self.comm.timeout:g}s\nHINT: is the filesystem of {self.dir} stuck or very slow?"
                    )
            else:
                time.sleep(0.005)
        self._inflight = None
        records = [json.loads(b) for b in self._allgather_bytes(json.dumps(f.job.record(f.local)).encode())]
        if self.rank != 0:
            if sync:
                self._agree_commit(None)
            return
        shared = dict(f.shared)
        layout = shared.pop("layout")
        shared["rng"] = [r["state"]["rng"] for r in sorted(records, key=lambda r: r["rank"])]
        state_mod.merge_untrained(shared, [r["state"] for r in records])
        protect = tuple(sorted(self._protected | ({self.resumed_from} if self.resumed_from is not None else set())))
        args = (self.dir, f.job.step, self.world, layout, records, shared, self.cfg.keep, protect)
        if sync:
            err = None
            try:
                commit(*args)
            except Exception as exc:
                err = exc
            self._agree_commit(err, f)
        else:
            self._commit_thread = threading.Thread(
                target=self._commit_bg, args=(f, *args), daemon=True, name="ckpt-commit"
            )
            self._commit_thread.start()

    def _skip_failed(self, f: _InFlight, why: str) -> None:
        """All ranks, together: a periodic save failed. Each waits for its own write to end (no
        straggler writes from the staging buffer the next save reuses), then rank 0 removes the
        temporary; the run goes on from the previous checkpoint."""
        if not f.done.wait(self.comm.timeout):
            raise CheckpointError(f"rank {self.comm.env.where}: a failed save of step {f.job.step} never ended")
        self._agree(0)
        if self.rank == 0:
            shutil.rmtree(tmp_dir(self.dir, f.job.step), ignore_errors=True)
        self.last_saved = f.previous
        if self.rank == 0 or f.error is not None:
            log.error(
                "rank %s: saving checkpoint step %s failed %s; training goes on, the resume point stays %s and "
                "the next save retries\nHINT: check free space and permissions of %s",
                self.comm.env.where,
                f.job.step,
                why,
                f"step {f.previous}" if f.previous >= 0 else "the start",
                self.dir,
            )

    def _agree_commit(self, err, f: _InFlight | None = None) -> None:
        flags = self._agree(1 if err is not None else 0)
        if flags[0] and f is not None and f.periodic:
            self._skip_failed(f, f"in the commit on rank 0{': ' + str(err) if err else ''}")
            return
        if flags[0]:
            raise CheckpointError(
                f"rank {self.comm.env.where}: committing the checkpoint failed on rank 0"
                + (f": {err}" if err else "; see its log")
            )

    def _commit_bg(self, f: _InFlight, *args) -> None:
        try:
            commit(*args)
        except BaseException as exc:
            if not f.periodic:
                self._commit_error = exc
                return
            shutil.rmtree(tmp_dir(self.dir, f.job.step), ignore_errors=True)
            log.error(
                "rank %s: committing checkpoint step %s failed (%s: %s); training goes on, the next save retries",
                self.comm.env.where,
                f.job.step,
                type(exc).__name__,
                exc,
            )

    def _join_commit(self) -> None:
        if self._commit_thread is not None:
            self._commit_thread.join(self.comm.timeout)
            if self._commit_thread.is_alive():
                raise CheckpointError(
                    f"rank {self.comm.env.where}: committing a checkpoint in {self.dir} did not finish within "
                    f"{self.comm.timeout:g}s\nHINT: is its filesystem stuck?"
                )
            self._commit_thread = None
        self._raise_commit_error()

    def _raise_commit_error(self) -> None:
        if self._commit_error is not None:
            err, self._commit_error = self._commit_error, None
            raise CheckpointError(
                f"rank {self.comm.env.where}: committing a checkpoint in {self.dir} failed: {type(err).__name__}: {err}"
            ) from err

    def _plan_for(self, shards: list) -> list[int]:
        """Indices of ``shards`` this rank writes (:func:`plan_writes`), computed once."""
        sig = shard_signature(shards)
        if self._plan is not None:
            if self._plan[0] != sig:
                raise CheckpointError(
                    f"rank {self.comm.env.where}: the strategy's state shards changed between "
                    "saves; the write plan is computed once"
                )
            return self._plan[1]
        mine = plan_writes(sig, self.rank, self._allgather_bytes)
        self._plan = (sig, mine)
        return mine

    # -- small collectives on the checkpoint group ------------------------------------------
    def _agree(self, value: int) -> list[int]:
        v = torch.zeros(self.world, dtype=torch.int32)
        v[self.rank] = value
        self.group.allreduce(v, ReduceOp.MAX)
        return v.tolist()

    def _allgather_bytes(self, data: bytes) -> list[bytes]:
        return allgather_bytes(self.group, data)

    def _bcast_json(self, obj):
        """Rank 0's ``obj`` on every rank."""
        data = json.dumps(obj).encode() if self.rank == 0 else b""
        return json.loads(self._allgather_bytes(data)[0])

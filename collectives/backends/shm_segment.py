"""Shared-memory segments for the ``shm`` backend: publish, attach, unlink, wait.

A segment is a file in /dev/shm that every rank of a group maps. Its first 4 KiB page is
a header: magic, world size, byte size, the creator's pid, then one pid slot per rank
(a rank attaches by writing its pid there). The name lives in /dev/shm only while ranks
attach: the last rank to attach (it sees every pid slot filled) unlinks it, and the
mapping survives the unlink. So once a communicator is built nothing is left in
/dev/shm, whatever happens to its processes later (SIGKILL included).

Bootstrap (who creates, how others find it): group rank 0 writes the segment under a
temporary name and renames it to its final name (atomic publish). The final name is
either deterministic, ``disttrain-<job>-<group>`` where ``<job>`` comes from
DISTTRAIN_JOB_ID (or MASTER_PORT, SLURM or MPI job ids), or, when the caller passes a
store, random and announced through the store. Other ranks poll for the name and map it;
a file whose creator is dead is stale and is skipped (rank 0 replaces it).

We map /dev/shm files with ``mmap`` directly instead of ``multiprocessing.shared_memory``
so that Python's resource tracker never sees (nor warns about, nor unlinks) them.
"""

from __future__ import annotations

import mmap
import os
import re
import time

from ..errors import CollectivesError, CollectiveTimeoutError, PeerDiedError

DEV_SHM = os.environ.get("DISTTRAIN_SHM_DIR", "/dev/shm")
HEADER = 4096
MAGIC = 0x3174727473696464  # b"ddistrt1" little-endian
_PID0 = 64  # int64 index of rank 0's pid slot in the header
MAX_RANKS = HEADER // 8 - _PID0


def job_tag(env: dict | None = None) -> str | None:
    """A name shared by every rank of this job, or None when nothing identifies the job."""
    env = os.environ if env is None else env
    for key in ("DISTTRAIN_JOB_ID", "TORCHELASTIC_RUN_ID", "PMI_KVSNAME", "PMIX_NAMESPACE"):
        if env.get(key):
            return _clean(env[key])
    if env.get("SLURM_JOB_ID"):
        return _clean(f"slurm{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}")
    if env.get("MASTER_PORT"):
        return _clean(f"port{env.get('MASTER_ADDR', '')}_{env['MASTER_PORT']}")
    return None


def _clean(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", s)[:80]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (zombies count as dead: a SIGKILLed child not yet reaped)."""
    if pid <= 0:
        return True  # not attached yet: nothing to say
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class Segment:
    """One mapped segment. ``q`` is an int64 memoryview over all of it (flags, counters)."""

    def __init__(self, name: str, path: str, mm: mmap.mmap, size: int, rank: int, world: int, ino: int):
        self.name, self.path, self.mm, self.size = name, path, mm, size
        self.rank, self.world, self._ino = rank, world, ino
        self.q = memoryview(mm).cast("q")

    def pid(self, rank: int) -> int:
        return self.q[_PID0 + rank]

    def missing(self) -> list[int]:
        return [r for r in range(self.world) if self.q[_PID0 + r] == 0]

    def maybe_unlink(self) -> None:
        """Remove our name from /dev/shm if it is still there and still ours."""
        try:
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.maybe_unlink()
        try:
            self.q.release()
            self.mm.close()
        except BufferError:
            pass  # tensors still view it (alloc'd buffers); the mapping goes when they do

    @classmethod
    def open(
        cls,
        name: str,
        rank: int,
        world: int,
        size: int,
        timeout: float,
        *,
        creator_pid: int | None = None,
        where: str = "",
    ) -> Segment:
        """Rank 0 creates ``name``; others attach. Returns once this rank is attached; doesn't wait for peers.

        ``creator_pid`` (when known, e.g. from a parent group) lets followers notice a dead creator early.
        """
        if world > MAX_RANKS:
            raise CollectivesError(f"rank {where}: shm supports at most {MAX_RANKS} ranks per group, got {world}")
        path = os.path.join(DEV_SHM, name)
        seg = (
            cls._create(name, path, rank, world, size)
            if rank == 0
            else cls._attach(name, path, rank, world, size, timeout, creator_pid, where)
        )
        seg.q[_PID0 + rank] = os.getpid()
        if not seg.missing():  # the last to attach removes the name; the mapping stays
            seg.maybe_unlink()
        return seg

    @classmethod
    def _create(cls, name: str, path: str, rank: int, world: int, size: int) -> Segment:
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
            ino = os.fstat(fd).st_ino
            seg = cls(name, path, mm, size, rank, world, ino)
            q = seg.q
            q[1], q[2], q[3] = world, size, os.getpid()
            q[0] = MAGIC  # last: a follower that sees the magic sees the rest
            os.rename(tmp, path)  # atomic publish; replaces a stale file of a dead job
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        finally:
            os.close(fd)
        return seg

    @classmethod
    def _attach(
        cls, name: str, path: str, rank: int, world: int, size: int, timeout: float, creator_pid: int | None, where: str
    ) -> Segment:
        deadline = time.monotonic() + timeout
        delay = 2e-4
        while True:
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                fd = -1
            if fd >= 0:
                try:
                    st = os.fstat(fd)
                    mm = mmap.mmap(fd, size) if st.st_size == size else None
                finally:
                    os.close(fd)
                if mm is not None:
                    seg = cls(name, path, mm, size, rank, world, st.st_ino)
                    q = seg.q
                    if q[0] == MAGIC and q[1] == world and q[3] > 0 and q[_PID0 + rank] == 0 and pid_alive(q[3]):
                        return seg
                    seg.q.release()
                    mm.close()  # stale (dead creator) or foreign: wait for rank 0 to replace it
            if creator_pid is not None and not pid_alive(creator_pid):
                raise PeerDiedError(
                    f"rank {where}: rank 0 of the group (pid {creator_pid}) died before "
                    f"creating shared-memory segment {name!r}"
                )
            if time.monotonic() > deadline:
                raise CollectiveTimeoutError(
                    f"rank {where}: shared-memory segment {path} did not appear within {timeout:.0f}s "
                    f"(waiting for group rank 0 to create it)\nHINT: every rank must create the communicator; "
                    f"ranks of one job need the same DISTTRAIN_JOB_ID (or MASTER_PORT) and the same host"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

"""Shared-memory segments for the ``shm`` backend: publish, attach, unlink, wait.

A segment is a file in /dev/shm that every rank of a group maps. Its first 4 KiB page is
a header: magic, world size, byte size, the creator's pid, then one pid slot per rank
(a rank attaches by writing its pid there). The name lives in /dev/shm only while ranks
attach: the last rank to attach (it sees every pid slot filled) unlinks it, and the
mapping survives the unlink. So once a communicator is built nothing is left in
/dev/shm, whatever happens to its processes later (SIGKILL included).

Bootstrap (who creates, how others find it): group rank 0 writes the segment under a
temporary name (``O_EXCL``, mode 0600) and renames it to its final name (atomic publish).
The final name is one no other user or job can predict: with a store (the launcher's
authenticated one), rank 0 draws a random nonce and announces it there; without one, a
digest of the job secret (``DISTTRAIN_JOB_SECRET``) and job id; only when neither exists,
the job id itself (DISTTRAIN_JOB_ID, a real TORCHELASTIC_RUN_ID, MPI or SLURM ids; never a
bare MASTER_PORT nor torchrun's default run id ``none``), which a stranger may guess.
Whatever the name, a follower trusts a file only after ``O_NOFOLLOW`` and ``fstat``: a
regular file of our uid with mode 0600. Anything else is refused and logged, never mapped;
a file whose creator is dead is stale and is skipped (rank 0 replaces it).

We map /dev/shm files with ``mmap`` directly instead of ``multiprocessing.shared_memory``
so that Python's resource tracker never sees (nor warns about, nor unlinks) them.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import re
import secrets
import stat
import time

from ...errors import CollectivesError, CollectiveTimeoutError, PeerDiedError

DEV_SHM = os.environ.get("DISTTRAIN_SHM_DIR", "/dev/shm")
HEADER = 4096
MAGIC = 0x3174727473696464  # b"ddistrt1" little-endian
_PID0 = 64  # int64 index of rank 0's pid slot in the header
MAX_RANKS = HEADER // 8 - _PID0
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
log = logging.getLogger(__name__)


def job_tag(env: dict | None = None) -> str | None:
    """A name shared by every rank of this job and unknown to others, or None when nothing
    identifies the job. With the job secret in the environment it is a digest of secret and
    job id; otherwise the job id itself (guessable by a local stranger, who can then make
    the segment fail to appear, but never get it trusted: see :meth:`Segment._attach`)."""
    env = os.environ if env is None else env
    job = None
    for key in ("DISTTRAIN_JOB_ID", "TORCHELASTIC_RUN_ID", "PMI_KVSNAME", "PMIX_NAMESPACE"):
        if env.get(key) and not (key == "TORCHELASTIC_RUN_ID" and env[key] == "none"):  # torchrun's default
            job = env[key]
            break
    if job is None and env.get("SLURM_JOB_ID"):
        job = f"slurm{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"
    if job is None:
        return None
    if env.get("DISTTRAIN_JOB_SECRET"):
        return hashlib.sha256(f"disttrain-shm\0{env['DISTTRAIN_JOB_SECRET']}\0{job}".encode()).hexdigest()[:32]
    return _clean(job)


def segment_nonce() -> str:
    """A fresh name part for rank 0 to announce through the job's store."""
    return secrets.token_hex(16)


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


def _untrusted(st: os.stat_result) -> str | None:
    """Why a segment file must not be trusted, or None: ours, a regular file, mode 0600."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not by us (uid {os.getuid()})"
    if stat.S_IMODE(st.st_mode) != 0o600:
        return f"mode {stat.S_IMODE(st.st_mode):04o}, not 0600"
    return None


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
            if os.lstat(self.path).st_ino == self._ino:
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
        fd = os.open(tmp, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask: followers accept exactly 0600
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
            ino = os.fstat(fd).st_ino
            seg = cls(name, path, mm, size, rank, world, ino)
            q = seg.q
            q[1], q[2], q[3] = world, size, os.getpid()
            q[0] = MAGIC  # last: a follower that sees the magic sees the rest
            try:
                os.rename(tmp, path)  # atomic publish; replaces a stale file of a dead job
            except PermissionError:  # /dev/shm is sticky: another user's file holds the name
                st = os.lstat(path)
                log.warning("rank 0: shared-memory segment name %s is taken by uid %d", path, st.st_uid)
                raise CollectivesError(
                    f"shared-memory segment {path} already exists and belongs to uid {st.st_uid}; refusing it"
                    "\nHINT: someone planted it under a name they guessed; pass the launcher's store to "
                    "collectives.init (names then carry a nonce) or set a secret DISTTRAIN_JOB_ID"
                ) from None
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
        refused: str | None = None
        while True:
            try:
                fd = os.open(path, _OPEN_FLAGS)
            except FileNotFoundError:
                fd = -1
            except OSError as exc:  # ELOOP: a symlink planted under our name
                fd, why = -1, f"cannot open it without following links ({exc.strerror})"
                if refused != why:
                    refused = why
                    log.warning("rank %s: refusing shared-memory segment %s: %s", where, path, why)
            if fd >= 0:
                try:
                    st = os.fstat(fd)
                    why = _untrusted(st)
                    if why is not None and refused != why:
                        refused = why
                        log.warning("rank %s: refusing shared-memory segment %s: %s", where, path, why)
                    mm = mmap.mmap(fd, size) if why is None and st.st_size == size else None
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
                    "(waiting for group rank 0 to create it)"
                    + (f"; a file there was refused: {refused}" if refused else "")
                    + "\nHINT: every rank must create the communicator; ranks of one job need the same "
                    "store or DISTTRAIN_JOB_ID and the same host"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

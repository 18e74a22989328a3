"""The replica store's private directory after its agent died: found and reclaimed by the next agent.

An agent removes its private directory (``launcher.replica_store``) when it closes. One that was
SIGKILLed (the OOM killer, ``kill -9``, a job step torn down hard) cannot, and the copies its workers
wrote there stay in ``/dev/shm``, that is in RAM, until the host reboots: on a shared node that is
memory no one can use, paid again by every job that dies that way.

So each directory gets an owner record as soon as it is made (:func:`mark`): the agent's pid, its
start time (``/proc/PID/stat``, so a reused pid is told apart), the kernel's boot id and the pid
namespace. An agent about to make its own directory first looks in the same base
(:func:`reclaim`) and removes a directory only when all of this holds:

- its name has our prefix, it is a directory (not a link) of this user, and it stays the same
  directory (device and inode) while we look;
- it holds an owner record: a regular file of this user with one link, never followed through a link.
  No record (another program's directory, or an agent between making it and writing its record):
  left alone;
- the record's boot id and pid namespace are ours (otherwise we cannot tell whether its agent
  lives: left alone), and no process with that pid and start time exists.

Inside, only regular files of this user are removed; anything else keeps the directory (logged).
Every removal is logged with the dead agent's pid and the bytes freed. We never delete what we
did not create: what no record of ours claims, what another user owns, what a live agent (of this
job or another) holds, is not touched.
"""

from __future__ import annotations

import json
import logging
import os
import stat

log = logging.getLogger(__name__)

PREFIX = "disttrain-replicas-"
OWNER = ".owner"  # the owner record in each directory
_MAX_RECORD = 4096


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rindex(b")") + 2 :].split()[19].decode()  # after "pid (comm) ": state is field 3


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_ns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def owner_record() -> dict:
    """This process as a directory's owner."""
    pid = os.getpid()
    return {"pid": pid, "start": _start_time(pid), "boot": _boot_id(), "pid_ns": _pid_ns()}


def mark(dir_fd: int) -> None:
    """Write the owner record into the directory open at ``dir_fd`` (a fresh one of ours: the name is new)."""
    fd = os.open(OWNER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    with os.fdopen(fd, "w") as f:
        json.dump(owner_record(), f)


def _read_owner(dir_fd: int) -> dict | None:
    try:
        fd = os.open(OWNER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_nlink != 1 or st.st_size > _MAX_RECORD:
            return None
        rec = json.loads(os.read(fd, _MAX_RECORD))
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def _dead(rec: dict) -> bool:
    """True only when the record's agent surely no longer runs (same boot and pid namespace as ours)."""
    pid, start = rec.get("pid"), rec.get("start")
    if not isinstance(pid, int) or pid <= 0 or rec.get("boot") != _boot_id() or rec.get("pid_ns") != _pid_ns():
        return False
    now = _start_time(pid)
    return now is None or now != start


def _empty(dir_fd: int, where: str) -> tuple[int, bool]:
    """Remove the regular files of this user in the directory; (bytes freed, whether nothing else is left)."""
    freed, clean = 0, True
    for name in os.listdir(dir_fd):
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
                os.unlink(name, dir_fd=dir_fd)
                freed += st.st_blocks * 512
            else:
                clean = False
                log.warning("replica directory %s: %s is not a regular file of this user; kept", where, name)
        except FileNotFoundError:
            continue  # another agent reclaiming at the same time
    return freed, clean


def reclaim(base: str) -> list[str]:
    """Remove the private directories in ``base`` whose agents died (see the module's rules); the
    paths removed. Never raises for what it finds there: a directory it cannot judge is left."""
    removed: list[str] = []
    try:
        base_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return removed
    try:
        for name in os.listdir(base_fd):
            if not name.startswith(PREFIX):
                continue
            where = os.path.join(base, name)
            try:
                st = os.stat(name, dir_fd=base_fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                    continue
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=base_fd)
            except OSError:
                continue
            try:
                here = os.fstat(fd)
                if (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
                    continue
                rec = _read_owner(fd)
                if rec is None or not _dead(rec):
                    continue
                freed, clean = _empty(fd, where)
            except OSError as exc:
                log.warning("replica directory %s: not reclaimed: %s", where, exc)
                continue
            finally:
                os.close(fd)
            if not clean:
                continue
            try:
                now = os.stat(name, dir_fd=base_fd, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    os.rmdir(name, dir_fd=base_fd)
            except OSError:
                continue
            removed.append(where)
            log.warning(
                "replica directory %s: its agent (pid %s) died without removing it; removed, %d bytes freed",
                where,
                rec.get("pid"),
                freed,
            )
    finally:
        os.close(base_fd)
    return removed

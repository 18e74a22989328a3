"""The flight recorder: each process keeps its last K collectives, and dumps them with every thread's
Python stack when asked, so a hang names the rank that is behind and the line where it stands.

Every op of every backend passes through :class:`~collectives.communicator.Communicator`, which
calls :meth:`FlightRecorder.begin` before it starts an op and :meth:`FlightRecorder.end` once it
completed: one list in a bounded deque, two clock reads and a short walk up the stack for the call
site (the first frame outside this package). A signature called before takes the fast paths, which call
:meth:`FlightRecorder.enter` with the site that signature was first called at: reading the caller's
frame costs a 4 KiB op's tenth. ``DISTTRAIN_FLIGHT_RECORDS`` sets K (default 64; 0:
record nothing). While a torch.profiler trace records (``labels``), each op is also a named range
(``allreduce#12 (world)``) in it.

With ``DISTTRAIN_TRACE_DIR`` set (the launcher's hang watch sets it to a private directory),
:func:`maybe_start_watch` starts one daemon thread per process that, every 0.2 s:
- writes ``rank<R>.beat`` (the count of completed collectives) when it changed, once its first
  collective began (set-up is not a hang): the launcher's sign of progress;
- answers ``dump.request`` (a nonce the launcher writes) with ``rank<R>.dump.json``: the records,
  every thread's stack (``sys._current_frames``, readable while the main thread blocks in C), the
  nonce; and a copy in the directory :func:`also_dump_to` named (the run directory's, which
  ``disttrain trace RUN_DIR`` prints).
A rank whose thread cannot answer (C code holding the GIL) still shows where it is: the watch
registers :data:`STACK_SIGNAL` with ``faulthandler``, which writes every thread's stack into
``rank<R>.stacks.txt`` from C when the launcher sends that signal.
Files are written to a temporary name and renamed, in directories the job created. The run
directory's ``traces/`` is a door (a shared-group run lets the group create in it): it is made
0700, an existing one must be a directory this user owns (a symlink is not followed, another
user's directory is refused with a warning naming the rank, and the dump stays in the launcher's
directory only), and dumps go through its descriptor into fresh unpredictable temporaries.
The watch thread works while holding a lock that ``os.fork`` takes too (``register_at_fork``), so a
process forked from this one (a DataLoader worker) never starts as a copy of a half-written file or
a half-held lock of that thread. A dump also lists this process's children (pid, state, the kernel
function they wait in), so a rank waiting on a stuck DataLoader worker shows which one and how.
"""

from __future__ import annotations

import collections
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback

from .fingerprint import call_site

FORMAT = 1
STACK_SIGNAL = signal.SIGRTMIN + 7  # the launcher's request for a faulthandler stack dump
_SEQ, _OP, _GROUP, _SHAPES, _DTYPE, _SITE, _START, _END = range(8)
_now = time.time


class FlightRecorder:
    """This process's last ``size`` collectives (all groups), newest last."""

    def __init__(self, size: int = 64):
        self.ring: collections.deque = collections.deque(maxlen=max(1, size))
        self.append = self.ring.append
        self.completed = 0
        self.labels = False  # also open a torch.profiler range per op (while a profile records)

    def begin(self, seq: int, op: str, group: str, shapes, dtype) -> list:
        entry = [seq, op, group, shapes, dtype, call_site(2), _now(), None]
        self.ring.append(entry)
        if self.labels:
            entry.append(_label_enter(f"{op}#{seq} ({group})"))
        return entry

    def enter(self, seq: int, op: str, group: str, shapes, dtype, site) -> list:
        """:meth:`begin` for the communicator's fast paths (a signature called before): ``site`` is where that
        signature was first called, not read off the stack again (materialising the caller's frame cost more
        than the rest of the entry). A dump's stacks still show the line a rank stands at."""
        entry = [seq, op, group, shapes, dtype, site, _now(), None]
        self.append(entry)
        if self.labels:
            entry.append(_label_enter(f"{op}#{seq} ({group})"))
        return entry

    def end(self, entry: list) -> None:
        entry[_END] = _now()
        self.completed += 1
        if len(entry) > 8:
            _label_exit(entry.pop())

    def records(self) -> list[dict]:
        out = []
        for e in list(self.ring):
            site = e[_SITE]
            out.append(
                {
                    "seq": e[_SEQ],
                    "op": e[_OP],
                    "group": e[_GROUP],
                    "shapes": [list(s) for s in e[_SHAPES]],
                    "dtype": str(e[_DTYPE]),
                    "bytes": _nbytes(e[_SHAPES], e[_DTYPE]),
                    "site": f"{site[0]}:{site[1]}" if isinstance(site, tuple) else str(site),
                    "start": e[_START],
                    "end": e[_END],
                }
            )
        return out


def _label_enter(name: str):
    import torch

    return torch.ops.profiler._record_function_enter_new(name, None)


def _label_exit(handle) -> None:
    import torch

    torch.ops.profiler._record_function_exit._RecordFunction(handle)


def _nbytes(shapes, dtype) -> int | None:
    import torch

    name = str(dtype).removeprefix("torch.")
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        return None
    n = 0
    for s in shapes:
        k = 1
        for d in s:
            k *= int(d)
        n += k
    return n * dt.itemsize


def stacks() -> list[dict]:
    """Every thread's Python stack, innermost frame last; the main thread first."""
    names = {t.ident: t.name for t in threading.enumerate()}
    main = threading.main_thread().ident
    out = []
    for ident, frame in sys._current_frames().items():
        frames = [{"file": f.filename, "line": f.lineno, "function": f.name} for f in traceback.extract_stack(frame)]
        out.append({"thread": names.get(ident, str(ident)), "main": ident == main, "frames": frames})
    out.sort(key=lambda t: not t["main"])
    return out


class NullRecorder(FlightRecorder):
    """``DISTTRAIN_FLIGHT_RECORDS=0``: records nothing (the overhead benchmark's baseline)."""

    def begin(self, seq: int, op: str, group: str, shapes, dtype) -> list:
        return []

    def enter(self, seq: int, op: str, group: str, shapes, dtype, site) -> list:
        return []

    def end(self, entry: list) -> None:
        pass


def build_recorder(size: int) -> FlightRecorder:
    return FlightRecorder(size) if size > 0 else NullRecorder(1)


RECORDER = build_recorder(int(os.environ.get("DISTTRAIN_FLIGHT_RECORDS") or 64))
_WATCH: dict = {"thread": None, "extra": None, "target": None, "stacks": None}  # target: (dir, rank, host)
_FORK_GUARD = threading.Lock()  # held by the watch thread while it works, and by os.fork around a fork
os.register_at_fork(before=_FORK_GUARD.acquire, after_in_parent=_FORK_GUARD.release, after_in_child=_FORK_GUARD.release)


def also_dump_to(path: str | None) -> None:
    """Also write this process's dumps into ``path`` (a directory; created on the first dump)."""
    _WATCH["extra"] = path


def snapshot(rank: int, host: str, nonce: str = "") -> dict:
    return {
        "format": FORMAT,
        "rank": rank,
        "host": host,
        "pid": os.getpid(),
        "time": time.time(),
        "nonce": nonce,
        "completed": RECORDER.completed,
        "records": RECORDER.records(),
        "stacks": stacks(),
        "children": children(),
    }


def children() -> list[dict]:
    """This process's child processes: pid, command name, state (R, S, D...) and the kernel function
    a sleeping one waits in (``wchan``); empty where /proc does not say."""
    out = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return out
    pids: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            continue
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/wchan") as f:
                wchan = f.read().strip()
        except OSError:
            continue
        name, rest = stat[stat.find("(") + 1 : stat.rfind(")")], stat[stat.rfind(")") + 2 :]
        out.append({"pid": pid, "name": name, "state": rest[:1], "wchan": wchan or "-"})
    return out


log = logging.getLogger(__name__)


def private_dir(path: str) -> int:
    """``path`` made or found private to this user (0700, ours, not a symlink), opened as a directory;
    OSError (PermissionError naming the owner) otherwise. The caller closes the descriptor."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    try:
        os.mkdir(path, 0o700)  # a planted dangling symlink is EEXIST here, not followed
    except FileExistsError:
        pass
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise PermissionError(f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
    os.fchmod(fd, 0o700)
    return fd


def write_at(dir_fd: int, name: str, text: str) -> None:
    """``text`` as ``name`` in the directory ``dir_fd``: a fresh temporary (unpredictable name,
    ``O_EXCL | O_NOFOLLOW``, 0600) renamed over it; a planted ``name`` is replaced, not followed."""
    tmp = f".{name}.{os.urandom(8).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise


def _copy_dump(directory: str, rank: int, host: str, text: str) -> None:
    """The dump's copy in the run directory (``also_dump_to``); a refused directory is dropped for
    good, with one warning naming the rank and host."""
    try:
        fd = private_dir(directory)
    except OSError as exc:
        _WATCH["extra"] = None
        log.warning("rank %s@%s: flight recorder: not writing into %s: %s (a symlink is not followed); the dump "
                    "is in the launcher's trace directory only", rank, host, directory, exc)  # fmt: skip
        return
    try:
        write_at(fd, f"rank{rank}.dump.json", text)
    finally:
        os.close(fd)


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _watch(period: float) -> None:
    beat, handled, target = -1, "", None
    while True:
        _FORK_GUARD.acquire()
        try:
            if _WATCH["target"] != target:  # the first place, or a new one after recovery in place
                beat = -1 if target is None else RECORDER.completed  # moved: beats once its new world's ops end
                target, handled = _WATCH["target"], ""
            directory, rank, host = target
            request = os.path.join(directory, "dump.request")
            if RECORDER.completed != beat and (beat >= 0 or RECORDER.ring):  # first beat: a collective began
                beat = RECORDER.completed
                _write(os.path.join(directory, f"rank{rank}.beat"), f"{beat}\n")
            try:
                with open(request) as f:
                    nonce = f.read(64).strip()
            except FileNotFoundError:
                nonce = ""
            if nonce and nonce != handled:
                handled = nonce
                text = json.dumps(snapshot(rank, host, nonce))
                _write(os.path.join(directory, f"rank{rank}.dump.json"), text)
                extra = _WATCH["extra"]
                if extra:
                    _copy_dump(extra, rank, host, text)
        except OSError:
            pass  # the directory went away with the job; keep quiet
        finally:
            _FORK_GUARD.release()
        time.sleep(period)


def maybe_start_watch(rank: int, host: str) -> None:
    """Start the watch thread once per process when ``DISTTRAIN_TRACE_DIR`` names a directory. Called
    again (a communicator rebuilt after recovery in place), it moves the watch to the new directory and
    rank, so the launcher's watch of the new round sees this process under its new rank."""
    directory = os.environ.get("DISTTRAIN_TRACE_DIR")
    if not directory or not os.path.isdir(directory) or _WATCH["target"] == (directory, rank, host):
        return
    path = os.path.join(directory, f"rank{rank}.stacks.txt")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    old, _WATCH["stacks"] = _WATCH["stacks"], os.fdopen(fd, "w")  # kept open: faulthandler writes to it
    faulthandler.register(STACK_SIGNAL, file=_WATCH["stacks"], all_threads=True, chain=False)
    if old is not None:
        old.close()
    with _FORK_GUARD:
        _WATCH["target"] = (directory, rank, host)
    if _WATCH["thread"] is None:
        t = threading.Thread(target=_watch, args=(0.2,), daemon=True, name="flight-recorder")
        _WATCH["thread"] = t
        t.start()

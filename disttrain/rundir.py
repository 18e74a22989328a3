"""The run directory: resolved config, metrics.jsonl, summary.json, loss.png, logs, checkpoints.

Only rank 0 writes here (logs are written by the launcher). The directory is a door: under
SLURM it sits on a shared filesystem, and whoever can write into it can plant a symlink
where we write, or swap the config whose targets every rank imports. So:

- :func:`prepare` creates it 0700 (0750 with ``run.shared_group``) and refuses one that
  exists but is not ours, or that another user could change: writable by others, writable
  by the group unless the user opted into a shared group directory, or under a parent that
  someone else can write, up to the first root-owned sticky directory (``/tmp``, ``/scratch``),
  where renaming another user's entry is not allowed.
- Files are replaced through :func:`write_atomic` (a ``mkstemp`` temporary, ``O_EXCL`` and
  ``O_NOFOLLOW``, then ``rename``) or appended through :func:`open_append` (``O_NOFOLLOW``,
  ours and regular, else refused). A planted symlink is replaced or refused, never followed.
- Files are created 0600, or 0640 with ``run.shared_group`` (:func:`file_mode`), so a group
  that shares weights reads them and nobody else does.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pwd
import stat
import tempfile

from .errors import DisttrainError

PRIVATE_DIR, SHARED_DIR = 0o700, 0o750
_shared = False  # this process's run.shared_group, set by prepare() and RunDir


class RunDirError(DisttrainError):
    """A run directory we must not write into; the message names it and says why."""


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _refuse(path: str, why: str, shared_group: bool) -> RunDirError:
    hint = (
        "HINT: use a directory only you can write (`mkdir -m 700 DIR`)"
        if shared_group
        else "HINT: use a directory only you can write (`mkdir -m 700 DIR`), or set run.shared_group=true to "
        "accept one shared with your group (its members can then replace your files and run code as you)"
    )
    return RunDirError(f"run directory {path}: {why}; nothing was written there\n{hint}")


def check(path: str, shared_group: bool = False) -> None:
    """Refuse (RunDirError) a run directory someone other than us could change: see the module doc."""
    real = os.path.realpath(path)
    me = os.geteuid()
    st = os.stat(real)
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "is not a directory", shared_group)
    if st.st_uid != me:
        raise _refuse(path, f"is owned by {_owner(st.st_uid)}, not by you", shared_group)
    if st.st_mode & 0o002 or (st.st_mode & 0o020 and not shared_group):
        who = "everyone" if st.st_mode & 0o002 else "its group"
        raise _refuse(path, f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):o})", shared_group)
    parent = os.path.dirname(real)
    while True:
        pst = os.stat(parent)
        if pst.st_uid == 0 and pst.st_mode & stat.S_ISVTX:
            return  # /tmp-like: only root or the entry's owner may rename what is inside
        if pst.st_uid not in (0, me):
            raise _refuse(path, f"its parent {parent} is owned by {_owner(pst.st_uid)}", shared_group)
        if pst.st_mode & 0o002 or (pst.st_mode & 0o020 and not shared_group):
            who = "everyone" if pst.st_mode & 0o002 else "its group"
            raise _refuse(
                path,
                f"its parent {parent} is writable by {who} (mode {stat.S_IMODE(pst.st_mode):o}), who can "
                "replace the run directory",
                shared_group,
            )
        if parent == "/":
            return
        parent = os.path.dirname(parent)


def prepare(path: str, shared_group: bool = False) -> str:
    """Create the run directory (0700, or 0750 for a shared group) or check the existing one; its
    absolute path. Raises RunDirError. Called by whoever first writes there: ``disttrain run``,
    ``disttrain submit`` and rank 0 of a worker."""
    global _shared
    _shared = shared_group  # the modes of everything this process creates in it
    path = os.path.abspath(path)
    mode = SHARED_DIR if shared_group else PRIVATE_DIR
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.mkdir(path, mode)
        os.chmod(path, mode)  # the umask may have taken bits away; never adds any beyond ``mode``
    except FileExistsError:
        pass
    check(path, shared_group)
    return path


def make_dir(path: str) -> None:
    """A directory inside the run directory (logs, slurm, a checkpoint's temporary): 0700, or 0750
    in a shared group run. An existing one must be a directory (a symlink is not followed)."""
    try:
        os.mkdir(path, dir_mode())
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise RunDirError(f"{path}: exists and is not a directory (a symlink is not followed)") from None


def private_dir(path: str) -> int:
    """``path`` (in a run directory) as a directory nobody else can change, opened: created with
    :func:`dir_mode` when missing, else it must be a real directory (a symlink is not followed) that
    we own, whose mode is then narrowed to :func:`dir_mode`. Raises RunDirError. Returns an
    ``O_DIRECTORY`` descriptor (the caller closes it): :func:`export_at` writes through it, so the
    path's components may change afterwards without redirecting a write."""
    try:
        os.mkdir(path, dir_mode())  # a planted dangling symlink is EEXIST here, not followed
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise RunDirError(f"{path}: not a directory of ours ({exc.strerror}); a symlink is not followed") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise RunDirError(f"{path}: is owned by {_owner(st.st_uid)}, not by you; nothing was written there")
    os.fchmod(fd, dir_mode())
    return fd


def export_at(dir_fd: int, name: str, export) -> None:
    """``export(path)`` (a library's writer, e.g. ``export_chrome_trace``) into a fresh temporary of
    the directory ``dir_fd`` (unpredictable name, ``O_EXCL | O_NOFOLLOW``, reached through
    ``/proc/self/fd``), then renamed to ``name`` there with :func:`file_mode`: a planted ``name``
    is replaced, never written through."""
    tmp = f".{name}.{os.urandom(8).hex()}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, file_mode(), dir_fd=dir_fd))
    try:
        export(f"/proc/self/fd/{dir_fd}/{tmp}")
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            os.fchmod(fd, file_mode())  # the writer may have made its own file
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise


def shared_group() -> bool:
    """This process's ``run.shared_group`` (set by :func:`prepare` and :class:`RunDir`)."""
    return _shared


def dir_mode() -> int:
    return SHARED_DIR if _shared else PRIVATE_DIR


def file_mode() -> int:
    """0600, or 0640 in a shared group run (the group reads weights and logs, nobody else)."""
    return 0o640 if _shared else 0o600


def write_atomic(path: str, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data``: a fresh temporary (``O_EXCL | O_NOFOLLOW``, unpredictable
    name) in the same directory, fsynced, then renamed over ``path``. A symlink at ``path`` is
    replaced, never written through."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode() if mode is None else mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def open_append(path: str, mode: int | None = None) -> io.BufferedWriter:
    """``path`` opened for appending (created if missing), refusing a symlink, a file that is not
    regular or one another user owns."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, file_mode() if mode is None else mode)
    except OSError as exc:
        raise RunDirError(f"{path}: cannot open for appending ({exc.strerror}); a symlink is not followed") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise RunDirError(f"{path}: not a regular file of yours; not written")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "ab")


log = logging.getLogger(__name__)


class RunDir:
    def __init__(self, path: str, rank: int, shared_group: bool = False):
        global _shared
        self.path, self.rank = path, rank
        _shared = shared_group
        if rank == 0:
            self.path = prepare(path, shared_group)
        self._metrics = open_append(os.path.join(self.path, "metrics.jsonl")) if rank == 0 else None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def log_metrics(self, record: dict) -> None:
        if self._metrics is not None:
            self._metrics.write((json.dumps(record) + "\n").encode())
            self._metrics.flush()

    def add_to_step(self, step: int, fields: dict) -> None:
        """``fields`` (the final evaluation) for step ``step`` (rank 0): joined to that step's line when
        it is the last one (a run stopped at a metrics-line step, e.g. by preemption), else a line of
        their own; each step has one line either way."""
        if self._metrics is None:
            return
        records = self.read_metrics()
        last = records[-1] if records else {}
        if last.get("step") != step or "event" in last or set(fields) & set(last):
            self.log_metrics({"step": step, **fields})
            return
        self._metrics.close()
        records[-1] = {**last, **fields}
        write_atomic(self.file("metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in records).encode())
        self._metrics = open_append(self.file("metrics.jsonl"))

    def resume_metrics(self, step: int) -> None:
        """A run resumed at ``step`` (rank 0): lines after it, which the resumed run writes again,
        leave metrics.jsonl (each step's line once), and a marker line records the resume."""
        if self._metrics is None:
            return
        self._metrics.close()
        kept = [r for r in self.read_metrics() if not isinstance(r.get("step"), int) or r["step"] <= step]
        lines = [json.dumps(r) + "\n" for r in kept] + [json.dumps({"event": "resume", "step": step}) + "\n"]
        write_atomic(self.file("metrics.jsonl"), "".join(lines).encode())
        self._metrics = open_append(self.file("metrics.jsonl"))

    def write_json(self, name: str, data: dict) -> None:
        if self.rank != 0:
            return
        write_atomic(self.file(name), json.dumps(data, indent=2).encode())

    def read_metrics(self) -> list[dict]:
        try:
            with open(self.file("metrics.jsonl")) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def plot_loss(self) -> bool:
        """loss.png from metrics.jsonl (rank 0): training loss and every evaluation point; skipped
        with a logged note where matplotlib, an optional extra (``disttrain[plot]``), is not
        installed. Returns whether the file was written."""
        if self.rank != 0:
            return False
        records = self.read_metrics()
        rows = [r for r in records if "loss" in r]
        if not rows:
            return False
        try:
            import matplotlib
        except ImportError:
            log.info("loss.png skipped: matplotlib is not installed (pip install 'disttrain[plot]' to get it)")
            return False

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
        evals = [r for r in records if "eval_loss" in r and isinstance(r.get("step"), int)]
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        write_atomic(self.file("loss.png"), png.getvalue())
        return True

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

"""The job secret of a SLURM job, and the files that carry it.

Where it comes from, first match wins: ``DISTTRAIN_JOB_SECRET``; the file named by
``DISTTRAIN_JOB_SECRET_FILE`` (our sbatch templates create one per job with
``python -m launcher.slurm.secret PATH``); else rank 0 (or the first node's agent) writes one
under a directory every node shares (the run directory) and the others wait for it.

A secret file is a door: anyone who can write it chooses the key of our store, anyone who
can read it can talk to the store. So before a file is trusted it must be a regular file
(not a symbolic link, not a FIFO), owned by the user running the job, with no permission
bits for group or others, and small; otherwise the job stops with an error naming the file,
what was found and a HINT, and the refusal is logged. The checks run on the opened file
descriptor, so the file cannot be swapped between check and read. Never imports torch.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
import sys
import time
from collections.abc import Mapping

from .. import environment as E
from ..channel import check_secret
from .errors import SlurmEnvError
from .place import SlurmPlace

log = logging.getLogger(__name__)

SECRET_FILE = "DISTTRAIN_JOB_SECRET_FILE"  # path of a 0600 file holding the job secret (sbatch templates)
MAX_SECRET_BYTES = 4096  # a secret is 64 hex digits; a bigger file is not one of ours


def _refuse(path: str, problem: str, hint: str) -> SlurmEnvError:
    log.warning("job secret %s refused: %s", path, problem)
    return SlurmEnvError(f"job secret file {path}: {problem}. HINT: {hint}")


def read_secret_file(path: str) -> str:
    """The secret in ``path``, after checking the file may be trusted (see the module docstring).

    Raises :class:`SlurmEnvError` naming the file and what is wrong with it."""
    try:
        # O_NOFOLLOW: a symbolic link is refused, not followed; O_NONBLOCK: a FIFO cannot hang us.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(path, "is a symbolic link", "the job secret must be a regular file of yours") from None
        raise SlurmEnvError(f"job secret file {path}: cannot read it ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, "is not a regular file", "point it at a file holding the secret")
        if st.st_uid != os.geteuid():
            raise _refuse(
                path,
                f"is owned by uid {st.st_uid}, not by this job's user (uid {os.geteuid()})",
                "someone else may have planted it; remove it, or export the secret yourself",
            )
        if st.st_mode & 0o077:
            raise _refuse(
                path,
                f"has mode {stat.S_IMODE(st.st_mode):04o}: group or others may read or write it",
                f"chmod 600 {path} (the submit script creates it 0600)",
            )
        data = f.read(MAX_SECRET_BYTES + 1)
    if len(data) > MAX_SECRET_BYTES:
        raise _refuse(path, f"is larger than {MAX_SECRET_BYTES} bytes", "a job secret is one line of hex digits")
    secret = data.decode("utf-8", "replace").strip()
    if not secret:
        raise SlurmEnvError(f"job secret file {path}: the file is empty")
    return secret


def write_secret_file(path: str) -> str:
    """Create ``path`` with a fresh secret: mode 0600, ours, never over an existing file or
    through a link (FileExistsError then). Written under a temporary name and hard-linked into
    place, so a reader never sees half a secret."""
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        os.link(tmp, path)  # unlike rename, fails when path exists
    finally:
        os.remove(tmp)
    return path


def ensure_secret_file(path: str) -> str:
    """The batch script's step: keep a trusted secret file at ``path`` (a requeued attempt of the
    same job reuses it), or create one. A file we may not trust is refused, never overwritten."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return write_secret_file(path)
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_size == 0:
        os.remove(path)  # ours and empty: a crash between creating and writing it
        return write_secret_file(path)
    read_secret_file(path)  # raises when the file may not be trusted
    return path


def job_secret(
    place: SlurmPlace,
    secret_dir: str | None,
    creator: bool,
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
) -> tuple[str, str | None]:
    """(secret, file we created or None). ``creator`` writes the fallback file; others wait for it."""
    env = os.environ if env is None else env
    if env.get(E.SECRET):
        return check_secret(env[E.SECRET], E.SECRET), None
    if env.get(SECRET_FILE):
        return read_secret_file(env[SECRET_FILE]), None
    if not secret_dir:
        raise SlurmEnvError(
            f"{place.where}: no job secret. HINT: export {E.SECRET} or {SECRET_FILE} (a 0600 file) "
            "in the batch script; `disttrain submit` does this"
        )
    # Named by job, step and restart: a file left by another job or attempt is never read.
    path = os.path.join(secret_dir, f".slurm-secret-{place.job_id}.{place.step_id}.{place.restart_count}")
    if creator:
        os.makedirs(secret_dir, exist_ok=True)
        try:
            write_secret_file(path)
        except FileExistsError:
            raise _refuse(
                path, "exists before rank 0 created it", f"someone else planted it; remove it, or export {SECRET_FILE}"
            ) from None
        return read_secret_file(path), path
    deadline = time.monotonic() + timeout
    while not os.path.lexists(path):
        if time.monotonic() > deadline:
            raise SlurmEnvError(
                f"{place.where}: waited {timeout:g}s for rank 0's job secret {path}. HINT: "
                f"{secret_dir} must be on a filesystem all nodes share, or export {SECRET_FILE}"
            )
        time.sleep(0.05)
    return read_secret_file(path), None


def main(argv: list[str] | None = None) -> int:
    """``python -m launcher.slurm.secret PATH``: what the sbatch templates run before srun."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(
            "usage: python -m launcher.slurm.secret PATH   (keep or create the job's 0600 secret file)", file=sys.stderr
        )
        return 2
    try:
        ensure_secret_file(argv[0])
    except (SlurmEnvError, OSError) as exc:
        print(f"disttrain: job secret: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

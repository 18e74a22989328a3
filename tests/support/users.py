"""A second local user for cross-user attack tests (created once with ``useradd``; needs root)."""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import tempfile
import time

import pytest

NAME = "dt_intruder"


def intruder() -> pwd.struct_passwd:
    """The other user, created when missing; skips the test when we cannot create users."""
    if os.geteuid() != 0:
        pytest.skip("cross-user tests need root to create a second user")
    for _ in range(20):
        try:
            return pwd.getpwnam(NAME)
        except KeyError:
            pass
        # Another process may hold /etc/passwd's lock for a moment: retry.
        subprocess.run(["useradd", "-M", "-N", "-s", "/bin/sh", NAME], capture_output=True, timeout=30)
        time.sleep(0.2)
    pytest.skip(f"could not create the user {NAME}")


def run_as(user: pwd.struct_passwd, argv: list[str], **kw) -> subprocess.CompletedProcess:
    """``argv`` as ``user`` (their uid and gid only), e.g. a shell that plants files."""
    return subprocess.run(["runuser", "-u", user.pw_name, "--", *argv], capture_output=True, text=True, **kw)


@contextlib.contextmanager
def sticky_base(prefix: str):
    """A /tmp-like directory: root-owned, sticky, world-writable, so another user can create in it."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o1777)
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", d], check=False)


def tree(d: str) -> dict[str, tuple]:
    """Every entry under ``d`` (not followed): its type and mode, owner, inode, size and, for a link, its
    target; equal before and after means nothing there was made, removed, replaced or changed in size."""
    out = {}
    for top, dirs, files in os.walk(d):
        for name in dirs + files:
            p = os.path.join(top, name)
            st = os.lstat(p)
            link = os.readlink(p) if os.path.islink(p) else None
            out[os.path.relpath(p, d)] = (st.st_mode, st.st_uid, st.st_ino, st.st_size, link)
    return out

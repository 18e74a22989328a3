"""Attacks on ``DISTTRAIN_REPLICA_SHM_BASE``, where an agent makes its private replica directory
(``launcher.replica_store.private_base``), by another local user (``tests/support/users``).

A base the stranger owns, one they can write (not sticky), one under a directory of theirs, and a
link they planted at the base's name: each is refused with an error naming the host, the path and
why, before anything is made there, and nothing of the stranger's is touched. A sticky base (as
/dev/shm) is taken: the agent's directory gets a fresh name the stranger cannot move, remove or
replace, entries the stranger planted there beforehand (directories and links named as ours) are
never used, and all of them are still there, unchanged, after the agent removed its own. A real
agent (``launcher.cli``, node 0 of two, torchrun-style) given a refused base exits 1 with the error.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys

import pytest

from launcher.replica_dir import OWNER
from launcher.replica_store import BASE_ENV, ReplicaDirError, ReplicaStore, replica_secret
from tests.support.users import intruder, run_as, sticky_base, tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = "job-base"


def _store() -> ReplicaStore:
    return ReplicaStore(replica_secret(secrets.token_hex(32), JOB), "127.0.0.1", max_bytes=1 << 20, job=JOB)


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.timeout(120)
def test_a_base_another_user_owns_or_can_swap_is_refused(monkeypatch):
    user = intruder()
    with sticky_base("dt-base-") as top:
        theirs = os.path.join(top, "theirs")  # made by the stranger, 0777
        _ok(run_as(user, ["sh", "-c", f"mkdir -m 777 {theirs} && echo keep > {theirs}/file"], timeout=30))
        open_dir = os.path.join(top, "open")  # ours, but anyone may rename entries in it
        os.mkdir(open_dir)
        os.chmod(open_dir, 0o777)
        under = os.path.join(theirs, "ours")  # ours, 0700, in a directory of the stranger's
        os.mkdir(under, 0o700)
        target = os.path.join(top, "target")  # ours and private: only the link to it is theirs
        os.mkdir(target, 0o700)
        link = os.path.join(top, "link")
        _ok(run_as(user, ["ln", "-s", target, link], timeout=30))
        before = tree(top)
        for base, why in [
            (theirs, f"belongs to uid {user.pw_uid}"),
            (open_dir, "is writable by other users (mode 777, not sticky)"),
            (under, f"{theirs} belongs to uid {user.pw_uid}"),
            (link, f"is a link of uid {user.pw_uid} (not followed)"),
            (os.path.join(top, "missing"), "No such file"),
        ]:
            monkeypatch.setenv(BASE_ENV, base)
            with pytest.raises(ReplicaDirError) as e:
                _store()
            msg = str(e.value)
            assert why in msg and socket.gethostname() in msg and f"HINT: point {BASE_ENV}" in msg, msg
        assert tree(top) == before  # nothing made, nothing of the stranger's touched
        with open(os.path.join(theirs, "file")) as f:
            assert f.read() == "keep\n"


@pytest.mark.timeout(120)
def test_a_sticky_base_is_taken_and_the_strangers_entries_are_neither_used_nor_removed(monkeypatch):
    user = intruder()
    with sticky_base("dt-base-") as base:
        # the stranger plants what an agent might take for its own: directories and links named as ours
        theirs = os.path.join(base, "their-target")
        plant = (
            f"mkdir -m 777 {theirs} && echo keep > {theirs}/file && "
            + " && ".join(f"mkdir -m 777 {base}/disttrain-replicas-p{i}" for i in range(4))
            + " && "
            + " && ".join(f"ln -s {theirs} {base}/disttrain-replicas-l{i}" for i in range(4))
        )
        _ok(run_as(user, ["sh", "-c", plant], timeout=30))
        planted = tree(base)
        monkeypatch.setenv(BASE_ENV, base)
        server = _store().start()
        try:
            d = server.shm_dir
            name = os.path.basename(d)
            assert os.path.dirname(d) == os.path.realpath(base) and name not in planted
            st = os.lstat(d)
            assert os.path.isdir(d) and not os.path.islink(d) and st.st_uid == os.getuid()
            assert st.st_mode & 0o777 == 0o700
            for what, argv in {
                "move ours away": ["mv", d, f"{base}/moved"],
                "remove ours": ["rm", "-rf", d],
                "replace ours by a link": ["ln", "-sfn", theirs, d],
                "plant inside": ["sh", "-c", f"echo x > {d}/planted"],
            }.items():
                res = run_as(user, argv, timeout=30)
                assert res.returncode != 0, f"{what}: the stranger succeeded: {res.stdout}{res.stderr}"
                assert "ermission denied" in res.stderr or "not permitted" in res.stderr, (what, res.stderr)
            assert os.lstat(d).st_ino == st.st_ino and os.listdir(d) == [OWNER]  # only its owner record
        finally:
            server.close()
        assert not os.path.lexists(d)  # ours went
        assert tree(base) == planted  # theirs stayed, every entry as they made it
        with open(os.path.join(theirs, "file")) as f:
            assert f.read() == "keep\n"


@pytest.mark.timeout(120)
def test_an_agent_given_a_base_another_user_owns_stops_with_the_error(monkeypatch):
    user = intruder()
    with sticky_base("dt-base-") as top:
        theirs = os.path.join(top, "theirs")
        _ok(run_as(user, ["mkdir", "-m", "777", theirs], timeout=30))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, BASE_ENV: theirs, "DISTTRAIN_JOB_SECRET": secrets.token_hex(32)}
        argv = [sys.executable, "-m", "launcher.cli", "--nnodes", "1:2", "--node-rank", "0"]
        argv += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--nproc-per-node", "1", "-m", "json.tool"]
        res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=90)
        assert res.returncode == 1, res.stdout + res.stderr
        assert f"{theirs} belongs to uid {user.pw_uid}" in res.stderr, res.stderr
        assert os.listdir(theirs) == []  # the agent made nothing there

"""Attacks on the own host's peer copies (``launcher.replica_store``: the agent's private directory).

Another local user (``tests/support/users``) tries to list the directory, read or overwrite a copy a
worker wrote there before its agent adopted it, plant a file or a link for the agent to adopt, and
read the adopted copy through the agent's mappings: every attempt is refused by the kernel, the
agent holds the worker's bytes unchanged, and nothing the stranger names is adopted.
"""

from __future__ import annotations

import os
import secrets

import pytest

from launcher.replica_dir import OWNER
from launcher.replica_store import ReplicaStore, replica_secret
from launcher.store import StoreClient, StoreError
from tests.support.users import intruder, run_as

JOB = "job-a"


def test_another_user_cannot_read_write_or_plant_own_host_copies():
    user = intruder()
    secret = replica_secret(secrets.token_hex(32), JOB)
    server = ReplicaStore(secret, "127.0.0.1", max_bytes=64 << 20, job=JOB).start()
    try:
        d = server.shm_dir
        data = os.urandom(1 << 20)
        seg = os.path.join(d, "r0-seg")
        fd = os.open(seg, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.close(fd)
        attempts = {
            "list": ["ls", d],
            "read": ["cat", seg],
            "overwrite": ["sh", "-c", f"printf x | dd of={seg} conv=notrunc"],
            "plant a file": ["sh", "-c", f"echo x > {d}/planted"],
            "plant a link": ["ln", "-s", "/etc/shadow", f"{d}/planted-link"],
            "remove": ["rm", "-f", seg],
        }
        for what, argv in attempts.items():
            res = run_as(user, argv, timeout=30)
            assert res.returncode != 0, f"{what}: another user succeeded: {res.stdout}{res.stderr}"
            assert "Permission denied" in res.stderr or "denied" in res.stderr.lower(), (what, res.stderr)
        assert sorted(os.listdir(d)) == [OWNER, "r0-seg"]
        c = StoreClient(server.address, secret, timeout=10, connect_timeout=5, prefix="", job=JOB)
        for name in ("planted", "planted-link"):
            with pytest.raises(StoreError, match="No such file"):
                c.adopt(name, 1 << 20, ["x"])
        c.adopt("r0-seg", 1 << 20, ["c/0/1/d/0"])
        assert c.get("c/0/1/d/0") == data and sorted(os.listdir(d)) == [OWNER, "r0-seg"]
        # the adopted copy lives only in the agent's mapping: not reachable through /proc either
        for argv in (["ls", f"/proc/{os.getpid()}/map_files/"], ["cat", f"/proc/{os.getpid()}/mem"]):
            res = run_as(user, argv, timeout=30)
            assert res.returncode != 0, f"{argv}: {res.stdout[:200]}"
        c.close()
    finally:
        server.close()
    assert not os.path.exists(server.shm_dir)

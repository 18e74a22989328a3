"""Attacks on shared-memory segments: a segment planted under the name a follower looks for
(owned by ``nobody``, world-writable, or a symlink) is refused and logged, never mapped; names
are not derivable from a bare MASTER_PORT or torchrun's run id ``none``, and two jobs that
share a job id but not a secret never meet."""

from __future__ import annotations

import logging
import mmap
import os
import pwd
import struct

import pytest

from collectives.backends.shm.segment import _PID0, DEV_SHM, HEADER, MAGIC, Segment, job_tag, segment_nonce
from collectives.errors import CollectiveTimeoutError

SIZE = HEADER + 4096


def _plant(path: str, *, owner: int | None = None, mode: int = 0o600) -> None:
    """A well-formed segment header (magic, world 2, a live creator, rank 1's slot free): the old
    follower would have mapped it and trusted whatever the planter writes there."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.ftruncate(fd, SIZE)
        mm = mmap.mmap(fd, SIZE)
        struct.pack_into("<qqqq", mm, 0, MAGIC, 2, SIZE, os.getpid())
        struct.pack_into("<q", mm, 8 * _PID0, os.getpid())
        mm.close()
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, owner, owner)
    finally:
        os.close(fd)


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["nobody", "world-writable", "symlink"])
def test_a_planted_segment_is_refused_and_logged(kind, caplog, tmp_path):
    name = f"disttrain-planted-{segment_nonce()}"
    path = os.path.join(DEV_SHM, name)
    if kind == "nobody":
        if os.geteuid() != 0:
            pytest.skip("creating a file owned by nobody needs root")
        _plant(path, owner=pwd.getpwnam("nobody").pw_uid)
        why = "owned by uid"
    elif kind == "world-writable":
        _plant(path, mode=0o666)
        why = "mode 0666, not 0600"
    else:
        target = str(tmp_path / "target")
        _plant(target)
        os.symlink(target, path)
        why = "without following links"
    try:
        with caplog.at_level(logging.WARNING, logger="collectives.backends.shm.segment"):
            with pytest.raises(CollectiveTimeoutError, match="a file there was refused") as e:
                Segment.open(name, 1, 2, SIZE, timeout=0.2, where="1@test")
        assert why in str(e.value)
        refusals = [r for r in caplog.records if "refusing shared-memory segment" in r.getMessage()]
        assert len(refusals) == 1 and why in refusals[0].getMessage()  # logged once, not once per poll
    finally:
        os.unlink(path)


@pytest.mark.unit
def test_segment_names_are_not_guessable_from_ports_or_default_run_ids():
    assert job_tag({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}) is None
    assert job_tag({"TORCHELASTIC_RUN_ID": "none", "MASTER_PORT": "29500"}) is None
    assert job_tag({"TORCHELASTIC_RUN_ID": "4f2a"}) == "4f2a"
    a = job_tag({"DISTTRAIN_JOB_ID": "same", "DISTTRAIN_JOB_SECRET": "a" * 64})
    b = job_tag({"DISTTRAIN_JOB_ID": "same", "DISTTRAIN_JOB_SECRET": "b" * 64})
    assert a != b and "same" not in a  # two jobs with one --run-id never meet; the id is not in the name
    assert a == job_tag({"DISTTRAIN_JOB_ID": "same", "DISTTRAIN_JOB_SECRET": "a" * 64})
    assert segment_nonce() != segment_nonce() and len(segment_nonce()) == 32


@pytest.mark.unit
def test_our_own_segment_is_created_0600_and_attached():
    name = f"disttrain-own-{segment_nonce()}"
    old = os.umask(0o277)  # a strict umask must not leave followers a 0400 file they refuse
    try:
        leader = Segment.open(name, 0, 2, SIZE, timeout=5, where="0@test")
    finally:
        os.umask(old)
    follower = Segment.open(name, 1, 2, SIZE, timeout=5, where="1@test")
    try:
        assert follower.pid(0) == os.getpid() and not os.path.exists(os.path.join(DEV_SHM, name))
    finally:
        follower.close()
        leader.close()

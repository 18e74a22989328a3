"""How a peer copy travels (single process: a real replica store on loopback, a real on-path proxy).

- Remote copies are bulk frames: the holder neither hashes nor copies their bytes. An on-path
  attacker who flips a byte of the blob gets it stored, and the copy's end-to-end tag refuses it
  before use; a flipped byte anywhere the channel MAC covers (the key, lengths, a plain SET's value)
  still drops the connection. The job's own store accepts no bulk frame at all.
- The own host's copy is a file the worker writes in the agent's private directory, adopted
  without the network: held as the copy's values (a mapping that outlives the name); links, extra hard links,
  odd names and sizes that do not make the announced chunks are refused and nothing is held.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
import threading

import pytest

from disttrain.fault import tag
from launcher.channel import MAC, NONCE
from launcher.replica_store import ReplicaStore, replica_secret
from launcher.store import StoreClient, StoreError, StoreServer

pytestmark = pytest.mark.unit
JOB = "job-a"


@pytest.fixture
def store():
    job_secret = secrets.token_hex(32)
    server = ReplicaStore(replica_secret(job_secret, JOB), "127.0.0.1", max_bytes=64 << 20, job=JOB).start()
    try:
        yield server, replica_secret(job_secret, JOB)
    finally:
        server.close()


def client(address: str, secret: str) -> StoreClient:
    return StoreClient(address, secret, timeout=10, connect_timeout=5, prefix="", job=JOB)


class FlipProxy:
    """Forwards one connection; flips the byte at ``at`` of the client's first frame (after its handshake)."""

    def __init__(self, target: str, at: int):
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.lsock.getsockname()[1]}"
        host, _, port = target.rpartition(":")
        self.target, self.flip_at = (host, int(port)), 1 + len(JOB) + NONCE + MAC + at
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        c, _ = self.lsock.accept()
        s = socket.create_connection(self.target)
        threading.Thread(target=self._pump, args=(s, c, None), daemon=True).start()
        self._pump(c, s, self.flip_at)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, flip: int | None) -> None:
        seen = 0
        try:
            while data := src.recv(1 << 16):
                if flip is not None and seen <= flip < seen + len(data):
                    data = bytearray(data)
                    data[flip - seen] ^= 0x40
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (dst, src):  # shutdown wakes the other direction's thread blocked in recv
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_a_blob_changed_on_the_way_is_stored_but_refused_by_its_tag(store):
    server, secret = store
    key, data = os.urandom(32), os.urandom(1 << 20)
    t = tag.sign(key, 3, 7, data)
    frame_head, key_field = 5, 4 + len("c/3/7/d/0") + 4
    c = client(FlipProxy(server.address, frame_head + key_field + 1000).address, secret)
    c.set_bulk("c/3/7/d/0", memoryview(data))
    held = bytes(server.get_local("c/3/7/d/0"))
    assert len(held) == len(data) and held != data  # the holder took it without hashing it ...
    assert not tag.verify(key, 3, 7, held, t)  # ... and its reader refuses it before use
    assert tag.verify(key, 3, 7, data, t)
    assert not tag.verify(key, 3, 8, data, t) and not tag.verify(key, 4, 7, data, t)  # bound to rank and step
    assert not tag.verify(os.urandom(32), 3, 7, data, t)
    c.close()


@pytest.mark.parametrize("where", ["key", "length", "plain value"])
def test_bytes_the_channel_covers_are_still_refused(store, where):
    server, secret = store
    at = {"key": 5 + 4 + 2, "length": 5 + 4 + len("c/3/7/d/0") + 3, "plain value": 5 + 4 + 9 + 4 + 1000}[where]
    c = client(FlipProxy(server.address, at).address, secret)
    with pytest.raises(StoreError):
        if where == "plain value":
            c.set("c/3/7/d/0", os.urandom(1 << 20))
        else:
            c.set_bulk("c/3/7/d/0", os.urandom(1 << 20))
    assert server.data == {} and server.rejected


def test_the_job_store_takes_no_bulk_frame():
    secret = secrets.token_hex(32)
    with StoreServer(secret, "127.0.0.1", job=JOB) as server:
        c = StoreClient(server.address, secret, timeout=10, connect_timeout=5, prefix="", job=JOB)
        with pytest.raises(StoreError):
            c.set_bulk("k", b"x" * 100)
        assert server.get_local("k") is None and "failed its MAC" in server.rejected[-1][1]


def write_segment(server: ReplicaStore, name: str, data: bytes) -> str:
    path = os.path.join(server.shm_dir, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data)
    os.close(fd)
    return path


def test_the_own_hosts_copy_is_adopted_from_the_private_directory(store):
    server, secret = store
    st = os.stat(server.shm_dir)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    data = os.urandom(5 << 20)
    path = write_segment(server, "r0-seg", data)
    c = client(server.address, secret)
    c.adopt("r0-seg", 2 << 20, ["c/0/4/d/0", "c/0/4/d/1", "c/0/4/d/2"])
    os.unlink(path)  # the writer's name may go: the store holds the pages through its mapping
    assert b"".join(c.get(f"c/0/4/d/{i}") for i in range(3)) == data
    assert server.nbytes == len(data) + 3 * len("c/0/4/d/0")
    c.delete_key("c/0/4/d/0")
    assert server.nbytes == len(data) - (2 << 20) + 2 * len("c/0/4/d/0")
    c.close()


def test_adopting_refuses_links_odd_names_and_wrong_sizes(store):
    server, secret = store
    c = client(server.address, secret)
    outside = write_segment(server, "victim", b"x" * 100)
    os.rename(outside, outside + ".moved")
    os.symlink(outside + ".moved", os.path.join(server.shm_dir, "link"))
    os.link(outside + ".moved", os.path.join(server.shm_dir, "hard"))
    write_segment(server, "ok", b"y" * 100)
    for name, chunk, keys, why in [
        ("link", 100, ["a"], "Too many levels of symbolic links"),
        ("hard", 100, ["a"], "one link"),
        ("../etc", 100, ["a"], "plain file name"),
        ("ok", 30, ["a"], "chunks"),
        ("ok", 100, ["a", "b"], "chunks"),
        ("missing", 100, ["a"], "No such file"),
    ]:
        with pytest.raises(StoreError, match=why):
            c.adopt(name, chunk, keys)
    assert server.data == {}
    c.close()


def test_prune_frees_the_copies_of_ranks_gone_and_keeps_the_rest(store):
    server, secret = store
    c = client(server.address, secret)
    for r in range(4):
        c.set_bulk(f"c/{r}/5/d/0", os.urandom(1000))
        c.set(f"c/{r}/5/rec", b"{}")
    c.set("c/1/steps", b"[5]")
    before = server.nbytes
    freed, held = c.prune(["c/2/", "c/3/"])
    assert sorted(server.data) == ["c/0/5/d/0", "c/0/5/rec", "c/1/5/d/0", "c/1/5/rec", "c/1/steps"]
    assert freed == before - server.nbytes > 2000 and held == server.nbytes
    assert c.prune([""]) == (0, server.nbytes)  # an empty prefix deletes nothing
    c.close()


def test_auto_every_keeps_copies_at_least_as_new_as_the_disk_checkpoint():
    """every=auto's k lands on a divisor of checkpoint.every (every disk step also gets a copy), and is
    never over it; without disk checkpoints the measured k stands."""
    from disttrain.fault.replica import aligned_every

    assert [aligned_every(k, 10) for k in (1, 2, 3, 4, 6, 9, 10, 37)] == [1, 2, 5, 5, 10, 10, 10, 10]
    assert aligned_every(7, 0) == 7
    for k in range(1, 30):
        assert 12 % aligned_every(k, 12) == 0 and aligned_every(k, 12) >= min(k, 12)


def test_staging_through_cached_views_writes_the_same_bytes_as_a_plain_stage(tmp_path):
    """Peer copies stage the same tensors into the same buffers every step through byte views made
    once (RankWrite.stage's ``views``): the bytes equal a plain stage's, after in-place updates, after a
    tensor is replaced (a new address) and with a non-contiguous tensor (no views: the plain path)."""
    import torch

    from disttrain.checkpoint.writer import RankWrite, aligned_empty
    from disttrain.parallel.strategy import Shard

    def shards(ts):
        return [
            Shard(f"t{i}", t, tuple(t.shape), tuple((0, n) for n in t.shape), replicated=True) for i, t in enumerate(ts)
        ]

    def staged(ts, step, buf, views=None):
        job = RankWrite(str(tmp_path), step, 0, shards(ts))
        buf.zero_()
        job.stage(buf, views)
        return bytes(buf[: job.size].numpy())

    ts = [torch.randn(33, 7), torch.arange(5, dtype=torch.int64), torch.tensor(3.0), torch.randn(4).to(torch.bfloat16)]
    buf, plain, views = aligned_empty(1 << 16), aligned_empty(1 << 16), {}
    for step in range(1, 4):
        for t in ts:
            t.add_(1)  # the training step changes the values in place
        assert staged(ts, step, buf, views) == staged(ts, step, plain)
        assert len(views["pairs"]) == len(ts)
    first = views["pairs"]
    ts[0] = torch.randn(33, 7)  # a new tensor: a new address, new views
    assert staged(ts, 4, buf, views) == staged(ts, 4, plain)
    assert views["pairs"] is not first
    ts[0] = torch.randn(7, 33).t()  # not contiguous: the plain path, the views left as they were
    assert staged(ts, 5, buf, views) == staged(ts, 5, plain)

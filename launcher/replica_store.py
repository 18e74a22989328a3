"""Peer replicas' home: an in-memory store each agent of a multi-node job holds for its peers' workers.

Workers copy their state (``disttrain.fault``) into the :class:`ReplicaStore` of their own agent and
of ``fault_tolerance.replicas`` other hosts' agents. An agent outlives its workers' restarts, so when
a host is lost the survivors' new workers find the copies of every old rank in the surviving agents'
memory and resume from them without reading a checkpoint from disk.

Doors: the store is :class:`launcher.store.StoreServer` (the same mutual HMAC handshake and per-frame
MACs), under a secret derived from the job secret *and the job id* (:func:`replica_secret`), so a
client of another job, or of this job's rendezvous store, cannot speak to it; it binds only the
address this host uses to reach the job's store (never all interfaces); one value is at most
``MAX_VALUE`` bytes and all copies at most ``max_bytes`` (``--replica-bytes``): a worker over the cap
is refused, and the agent's memory stays bounded. Nothing in it is ever unpickled or evaluated:
values are the checkpoint writer's safetensors bytes and JSON records.

The own host's copy skips the network (:meth:`ReplicaStore.adopt`): the store makes a private
directory (``mkdtemp``: 0700, an unpredictable name, in ``/dev/shm`` when there is one) and hands it
to its workers in ``SHM_ENV``; a worker writes its snapshot straight into a new file there and asks
the store (over the authenticated channel) to adopt it: the store opens it without following links,
checks it is a regular file of this user with one link and a size within the caps, maps it
read-only and holds its pages as the copy's values. The worker reuses a file once the copy in it
was dropped (no fresh pages per copy), removes its files when it ends, and the store removes what
is left with the directory when it closes; an owner record in the directory lets the next agent on
the host remove it if this one is SIGKILLed (:mod:`launcher.replica_dir`). Another local user cannot
list, read, write or plant anything in that directory; no MAC is computed for this copy (the
reader still checks the copy's end-to-end tag).

Who calls what: the agent calls :func:`start_replica_store` once (before joining the rendezvous,
so the address is in the job store when a round starts) and passes the round's addresses to its
workers in ``DISTTRAIN_REPLICA_STORES`` (members' order, which is the node order of ranks);
a worker calls :func:`replica_addresses_from_env` and :func:`connect_replica`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import mmap
import os
import re
import socket
import stat
import tempfile

from . import replica_dir
from .errors import LauncherError
from .store import StoreServer, _Refused
from .store_client import ADOPT, OK, PRUNE, SET_BULK, StoreClient

log = logging.getLogger(__name__)

SHM_ENV = "DISTTRAIN_REPLICA_SHM"  # the own agent's private directory for host-local copies
BASE_ENV = "DISTTRAIN_REPLICA_SHM_BASE"  # where agents make those directories (default /dev/shm); a test or
# benchmark points it at a directory of its own, so it can remove what its SIGKILLed agents left there
# without touching another job's. Checked by private_base(): no other user may own or rename into it
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
ENV = "DISTTRAIN_REPLICA_STORES"  # "JOB;host:port,host:port,...": the job id bound, one store per node of the round
ADDRESS_KEY = "agent/replica/{node}"  # in the job store: each agent's replica store address
JOB_KEY = "agent/replica/job"  # the job id the stores' secret is bound to (the first agent's; nodes of a
# torchrun-style start draw their own ids unless --run-id is given)
MAX_VALUE = 32 << 20  # one piece of a copy (writers chunk below it)
DEFAULT_MAX_BYTES = 8 << 30


def replica_secret(job_secret: str, job_id: str) -> str:
    """The replica stores' secret: HMAC of the job id under the job secret (hex, 64 characters)."""
    return hmac.new(job_secret.encode(), b"disttrain-replica|" + job_id.encode(), hashlib.sha256).hexdigest()


class ReplicaDirError(LauncherError):
    """The base for the private directory (``BASE_ENV``) is one another user could swap or read."""


def private_base(base: str) -> str:
    """``base`` resolved, once every directory on its path is found to be one no other user can
    swap entries in: owned by this user or root, and writable by no one else unless sticky (as
    ``/dev/shm`` and ``/tmp``, where only an entry's owner may rename it). A link at ``base`` must be
    ours or root's. Anything else is a :class:`ReplicaDirError` naming the host, the path and why:
    a directory whose name another user could repoint would let them read the copies our workers
    write there, or make our cleanup remove what is theirs."""
    me, host = os.getuid(), socket.gethostname()

    def refuse(path: str, why: str) -> ReplicaDirError:
        return ReplicaDirError(
            f"replica directory on {host}: {BASE_ENV}={base!r}: {path} {why}\nHINT: point {BASE_ENV} at a directory "
            f"of yours that only you can write (mode 0700), or unset it for /dev/shm"
        )

    try:
        st = os.lstat(base)
    except OSError as exc:
        raise refuse(base, f"cannot be used: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode) and st.st_uid not in (0, me):
        raise refuse(base, f"is a link of uid {st.st_uid} (not followed)")
    real = os.path.realpath(base)
    path = real
    while True:
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise refuse(path, "is not a directory")
        if st.st_uid not in (0, me):
            raise refuse(path, f"belongs to uid {st.st_uid}, who could swap what we make in it")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise refuse(path, f"is writable by other users (mode {stat.S_IMODE(st.st_mode):o}, not sticky)")
        if path == "/":
            return real
        path = os.path.dirname(path)


class ReplicaStore(StoreServer):
    """One agent's store of its peers' copies. Bounded: ``max_bytes`` in all, ``MAX_VALUE`` a value.

    Copies arrive as bulk frames (``launcher.channel``): the holder neither hashes nor copies their
    bytes; each copy carries the writer's end-to-end tag in its record, and its reader checks it
    before use (``disttrain.fault.tag``), so bytes changed on the way are refused there."""

    bulk_codes = frozenset({SET_BULK})

    def __init__(self, secret: str, host: str, *, max_bytes: int = DEFAULT_MAX_BYTES, job: str = ""):
        base = os.environ.get(BASE_ENV) or None
        if base is None and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
            base = "/dev/shm"
        base = private_base(base or tempfile.gettempdir())  # the agent prints the error and stops
        # 0700, ours, a fresh unpredictable name (an existing entry, a planted link included, is never reused);
        # pinned by device and inode: every later open checks it is still this directory
        replica_dir.reclaim(base)  # what agents SIGKILLed earlier left there (in RAM, under /dev/shm)
        self.shm_dir = tempfile.mkdtemp(prefix=replica_dir.PREFIX, dir=base)
        st = os.lstat(self.shm_dir)
        self._shm_id = (st.st_dev, st.st_ino)
        try:
            fd = self._open_shm_dir()
            try:
                replica_dir.mark(fd)  # so that the next agent may reclaim it if this one is SIGKILLed
            finally:
                os.close(fd)
            super().__init__(secret, host, 0, job=job)  # the job id is in the handshake too (launcher.channel)
        except BaseException:
            self._remove_shm_dir()
            raise
        self.max_value, self.max_total = MAX_VALUE, max_bytes
        self.job_id = job

    def _open_shm_dir(self) -> int:
        """A descriptor of the private directory, never through a link, refused unless it is the one we made."""
        fd = os.open(self.shm_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self._shm_id or st.st_uid != os.getuid():
            os.close(fd)
            log.error("replica store: %s is no longer the directory it made; not used", self.shm_dir)
            raise OSError(f"{self.shm_dir} was replaced")
        return fd

    def close(self) -> None:
        super().close()
        self._remove_shm_dir()

    def _remove_shm_dir(self) -> None:
        """The private directory and what our workers left in it (regular files of this user only)."""
        try:
            fd = self._open_shm_dir()
        except OSError:
            return  # gone, or not ours any more: nothing in it is removed
        try:
            for name in os.listdir(fd):
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
                    os.unlink(name, dir_fd=fd)
        finally:
            os.close(fd)
        try:
            st = os.lstat(self.shm_dir)
            if (st.st_dev, st.st_ino) == self._shm_id:
                os.rmdir(self.shm_dir)
        except OSError as exc:
            log.warning("replica store: could not remove %s: %s", self.shm_dir, exc)

    def adopt(self, name: str, chunk: int, keys: list[str]) -> None:
        """Hold the segment ``name`` of the private directory as ``keys`` (``chunk`` bytes each): a
        mapping of its pages, which outlives the name (the writer may remove it, or rewrite the file
        for a later copy once this one's keys are dropped).
        Refused (and nothing held) unless it is a regular file of this user with one link whose size
        needs exactly ``len(keys)`` chunks within the caps."""
        if not _NAME.fullmatch(name):
            raise _Refused(f"segment name {name[:40]!r} is not a plain file name")
        try:
            dfd = self._open_shm_dir()
        except OSError as exc:
            raise _Refused(f"segment {name!r}: the private directory: {exc}") from None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as exc:
            os.close(dfd)
            raise _Refused(f"segment {name!r}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            size = st.st_size
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_nlink != 1:
                raise _Refused(f"segment {name!r} is not a regular file of this user with one link")
            if not 0 < chunk <= self.value_cap or len(keys) != max(1, -(-size // chunk)):
                raise _Refused(f"segment {name!r}: {size} bytes do not make {len(keys)} chunks of {chunk}")
            view = memoryview(mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)) if size else memoryview(b"")
            with self.cond:
                if self.nbytes + size + sum(map(len, keys)) > self.total_cap:
                    raise _Refused(f"the store holds {self.nbytes} bytes; {name!r} would pass {self.total_cap}")
                for i, key in enumerate(keys):
                    self._put(key, view[i * chunk : (i + 1) * chunk])
                self.cond.notify_all()
        finally:
            os.close(fd)
            os.close(dfd)

    def _handle(self, code: int, f: list[bytes]) -> tuple[int, list[bytes]]:
        if code == ADOPT:
            self.adopt(f[0].decode(), int(f[1]), [k.decode() for k in f[2:]])
            return (OK, [])
        if code == PRUNE:  # copies no one will read again (a rank of an older, larger world)
            prefixes = tuple(p.decode() for p in f if p)
            with self.cond:
                before = self.nbytes
                for key in [k for k in self.data if prefixes and k.startswith(prefixes)]:
                    self._pop(key)
                return (OK, [str(before - self.nbytes).encode(), str(self.nbytes).encode()])
        return super()._handle(code, f)


def local_address_towards(address: str) -> str:
    """The address of this host on the route to ``address`` (host:port); no packet is sent (UDP connect)."""
    host, _, port = address.rpartition(":")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host.strip("[]"), int(port)))
        return s.getsockname()[0]


def start_replica_store(
    job_client: StoreClient, job_store: str, secret: str, job_id: str, node_rank: int, max_bytes: int
) -> ReplicaStore:
    """Agent, once, before joining: open this host's replica store on the address that reaches the
    job's store and publish it there for the workers of every round. ``server.job_id`` is the id
    its secret is bound to, agreed through the job store."""
    bind = local_address_towards(job_store)
    bound = job_client.compare_set(JOB_KEY, "", job_id).decode()
    server = ReplicaStore(replica_secret(secret, bound), bind, max_bytes=max_bytes, job=bound).start()
    job_client.set(ADDRESS_KEY.format(node=node_rank), server.address)
    log.debug("node %d: replica store on %s (at most %d bytes)", node_rank, server.address, max_bytes)
    return server


def round_env(job_client: StoreClient, job_id: str, members: list[int]) -> str:
    """Agent, at a round's start: ``ENV``'s value for the members' workers (members' order)."""
    return job_id + ";" + ",".join(job_client.get(ADDRESS_KEY.format(node=n)).decode() for n in members)


def shm_dir_from_env() -> str | None:
    """Worker: its own agent's private directory for host-local copies, or None."""
    return os.environ.get(SHM_ENV) or None


def replica_addresses_from_env() -> list[str] | None:
    """Worker: the round's replica store addresses (index = node of the round), or None when the
    launcher runs none (a single node, another launcher)."""
    _, _, addrs = os.environ.get(ENV, "").partition(";")
    return [a for a in addrs.split(",") if a] or None


def _job_secret() -> tuple[str, str]:
    from . import store_client

    secret = store_client._secret_taken or os.environ.get(store_client._SECRET_ENV)
    if not secret:
        raise ConnectionError(
            f"{ENV} is set but the job secret is not\nHINT: start workers with disttrain launch, which passes both"
        )
    return secret, os.environ.get(ENV, "").partition(";")[0]


def replica_tag_key() -> bytes:
    """Worker: the key of the copies' end-to-end tags (writers and readers of this job hold it; a
    holder's network peers do not): HMAC of the job id under the job secret, apart from the stores'."""
    secret, job_id = _job_secret()
    return hmac.new(secret.encode(), b"disttrain-replica-tag|" + job_id.encode(), hashlib.sha256).digest()


def connect_replica(address: str, timeout: float = 60.0) -> StoreClient:
    """Worker: a client of one replica store, authenticated with the job's derived secret."""
    secret, job_id = _job_secret()
    return StoreClient(
        address, replica_secret(secret, job_id), timeout=timeout, connect_timeout=timeout, prefix="", job=job_id
    )

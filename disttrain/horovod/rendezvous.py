"""The worker side of an elastic job: which world this process is in, and the next one.

Under ``disttrain launch --min-np/--max-np --host-discovery-script`` the driver
(``launcher/driver.py``) gives each worker ``DISTTRAIN_ELASTIC_ID`` and publishes worlds through
the job's store (the keys are listed in that module). ``hvd.init()`` then calls :func:`join`
instead of reading the rank from the environment: it waits for a world newer than the one this
process was in, finds its place there (or exits 0 when the world left it out), meets the other
members at a store barrier, and builds a communicator in that world's own store namespace. A
thread watches ``elastic/version`` and tells the registered listeners (the elastic ``State``
objects, see ``disttrain.horovod.elastic``) about each new world; ranks act on it together at the
next ``commit()``. After a failed collective :func:`request_reset` asks the driver for a new world.

Backend: ``DISTTRAIN_HVD_BACKEND`` if set, else ``shm`` when the whole world runs on one machine
(each world has its own store prefix, so its segment's name is agreed there, whatever worlds a
process built before), else ``torch`` (gloo).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable

import collectives
from collectives import registry

from .exceptions import HorovodInternalError

log = logging.getLogger(__name__)

ELASTIC_ID = "DISTTRAIN_ELASTIC_ID"  # set by launcher/driver.py; its presence means elastic mode
WATCH_INTERVAL = 0.1  # seconds between two reads of elastic/version by the watch thread

Listener = Callable[[int, bool, bool], None]  # (version, hosts added, hosts removed)


def enabled() -> bool:
    return ELASTIC_ID in os.environ


class _Rendezvous:
    """One per process (elastic mode only), made by the first :func:`join`."""

    def __init__(self, timeout: float):
        from launcher import AuthStore

        self.id = os.environ[ELASTIC_ID]
        self.store = AuthStore.from_env(timeout, prefix="")
        if self.store is None:
            raise HorovodInternalError(
                f"{ELASTIC_ID} is set but DISTTRAIN_STORE is not: an elastic worker needs the driver's store\n"
                "HINT: start elastic jobs with `disttrain launch --min-np N --max-np M --host-discovery-script S`"
            )
        self.version = -1  # the world this process is in (-1: none yet)
        self.listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._notified = -1
        self._watch_store = self.store.clone()  # the watch thread's own connection
        self._watch = threading.Thread(target=self._watch_loop, name="hvd-elastic-watch", daemon=True)
        self._watch.start()

    def _latest(self, store) -> int:
        return int(store.get("elastic/version")) if store.check(["elastic/version"]) else -1

    def _done(self) -> bool:
        return self.store.check(["elastic/done"])

    def join(self, timeout: float) -> tuple[collectives.Communicator, str, collectives.DistEnv]:
        """Block until a world newer than ``self.version`` forms with this worker in it."""
        deadline = time.monotonic() + timeout
        while True:
            if self._done():
                log.info("worker %s: the job finished before this worker's world formed; exiting", self.id)
                raise SystemExit(0)
            v = self._latest(self.store)
            if v <= self.version:
                if time.monotonic() > deadline:
                    raise HorovodInternalError(
                        f"worker {self.id} on {os.environ.get('DISTTRAIN_HOST', '?')}: no new world from the "
                        f"driver within {timeout:g}s (still world {self.version})"
                    )
                time.sleep(0.05)
                continue
            world = json.loads(self.store.get(f"elastic/world/{v}"))
            ids = [w["id"] for w in world["workers"]]
            if self.id not in ids:
                log.info("worker %s: left out of world %d (its host was removed); exiting", self.id, v)
                raise SystemExit(0)
            self.store.set(f"elastic/ready/{v}/{self.id}", b"1")
            # A member that has not arrived is alive (else the driver publishes a newer world), but
            # may still wait for its own op of the old world to time out: give it that long too.
            if self._barrier(v, ids, time.monotonic() + 2 * timeout):
                break
        row = world["workers"][ids.index(self.id)]
        env = self._export(row, ids.index(self.id), len(ids))
        backend, comm_env = self._backend(world["workers"], env)
        import torch.distributed as dist

        try:
            comm = collectives.init(
                backend, store=dist.PrefixStore(f"elastic/{v}", self.store), env=comm_env, check=False, timeout=timeout
            )
        except collectives.CollectivesError as exc:
            raise HorovodInternalError(f"rank {env.where}: could not build world {v}: {exc}") from exc
        with self._lock:
            self.version = v
            self._notified = max(self._notified, v)
        log.info("rank %s: joined world %d of %d worker(s) over %s", env.where, v, len(ids), backend)
        return comm, backend, env

    @staticmethod
    def _backend(rows: list[dict], env: collectives.DistEnv) -> tuple[str, collectives.DistEnv]:
        """``DISTTRAIN_HVD_BACKEND``, else ``shm`` when every worker of the world runs on this
        machine (the driver's ``machine`` column: host names such as 127.0.0.2 may differ while
        the machine is the same), else ``torch``. shm's env counts ranks per machine; Horovod's
        local ranks (``env``) stay per host name."""
        chosen = os.environ.get("DISTTRAIN_HVD_BACKEND")
        machines = [r.get("machine") for r in rows]
        if chosen is None and machines[0] is not None and len(set(machines)) == 1:
            try:
                if registry.get("shm").is_available():
                    return "shm", dataclasses.replace(env, local_rank=env.rank, local_world_size=env.world_size)
            except collectives.BackendUnavailableError:
                pass
        return chosen or "torch", env

    def _barrier(self, v: int, ids: list[str], deadline: float) -> bool:
        """True once every member of world ``v`` arrived; False when a newer world appeared first."""
        keys = [f"elastic/ready/{v}/{i}" for i in ids]
        while not self.store.check(keys):
            if self._latest(self.store) > v or self._done():
                return False
            if time.monotonic() > deadline:
                missing = [i for i, k in zip(ids, keys) if not self.store.check([k])]
                raise HorovodInternalError(f"worker {self.id}: world {v}: workers {missing} never arrived")
            time.sleep(0.02)
        return True

    @staticmethod
    def _export(row: dict, rank: int, size: int) -> collectives.DistEnv:
        """This world's place, in torchrun's and horovodrun's variables (so later readers agree)."""
        place = {
            "RANK": rank,
            "WORLD_SIZE": size,
            "LOCAL_RANK": row["local_rank"],
            "LOCAL_WORLD_SIZE": row["local_size"],
            "GROUP_RANK": row["cross_rank"],
            "HOROVOD_RANK": rank,
            "HOROVOD_SIZE": size,
            "HOROVOD_LOCAL_RANK": row["local_rank"],
            "HOROVOD_LOCAL_SIZE": row["local_size"],
            "HOROVOD_CROSS_RANK": row["cross_rank"],
            "HOROVOD_CROSS_SIZE": row["cross_size"],
        }
        os.environ.update({k: str(v) for k, v in place.items()})
        return collectives.read_env(os.environ)

    def request_reset(self) -> None:
        self.store.set(f"elastic/reset/{self.id}", str(self.version).encode())

    def _watch_loop(self) -> None:
        while True:
            time.sleep(WATCH_INTERVAL)
            try:
                latest = self._latest(self._watch_store)
                with self._lock:
                    first = self._notified + 1
                    if latest < first or self.version < 0:
                        continue
                    self._notified = latest
                    listeners = list(self.listeners)
                for v in range(first, latest + 1):
                    world = json.loads(self._watch_store.get(f"elastic/world/{v}"))
                    for listen in listeners:
                        listen(v, bool(world["added"]), bool(world["removed"]))
            except Exception as exc:  # the store is gone: the driver ended the job; nothing to tell
                log.debug("worker %s: elastic watch stopped: %s", self.id, exc)
                return


_rdzv: _Rendezvous | None = None


def join(timeout: float) -> tuple[collectives.Communicator, str, collectives.DistEnv]:
    """``hvd.init()`` in elastic mode: this process's next world, its backend and this rank's
    place in Horovod's terms (local = same host name); blocks, see the module doc."""
    global _rdzv
    if _rdzv is None:
        _rdzv = _Rendezvous(timeout)
    return _rdzv.join(timeout)


def current_version() -> int:
    return _rdzv.version if _rdzv is not None else -1


def request_reset() -> None:
    if _rdzv is not None:
        _rdzv.request_reset()


def add_listener(listener: Listener) -> None:
    if _rdzv is not None:
        with _rdzv._lock:
            _rdzv.listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    if _rdzv is not None:
        with _rdzv._lock:
            if listener in _rdzv.listeners:
                _rdzv.listeners.remove(listener)

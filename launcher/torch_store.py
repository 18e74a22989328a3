"""Worker side: the job's authenticated store as a ``torch.distributed.Store``.

Imported only inside workers (it imports torch). Two ways in:

* explicit: ``dist.init_process_group("gloo", store=AuthStore.from_env(), rank=..., world_size=...)``
  (``disttrain.worker`` does this and hands the store to ``collectives.init``);
* unchanged torchrun scripts: ``launcher.bootstrap`` installs :func:`install_env_handler` the
  moment ``torch.distributed.rendezvous`` is imported, so ``init_process_group()`` with the
  default ``env://`` meets at our store instead of opening an unauthenticated TCPStore.
"""

from __future__ import annotations

import datetime
import os

import torch.distributed as dist

from .store import StoreClient, StoreTimeout, connect_from_env, env_has_store

# torch's C++ side holds only the base object; once the Python object is gone its overrides
# vanish ("Not implemented"). Stores live as long as the worker does, so keep them here.
_ALIVE: list[AuthStore] = []


def _seconds(t) -> float:
    return t.total_seconds() if isinstance(t, datetime.timedelta) else float(t)


class AuthStore(dist.Store):
    """torch's Store interface over :class:`launcher.store.StoreClient` (torch calls these methods)."""

    def __init__(self, client: StoreClient, timeout: float | None = None):
        super().__init__()
        self._client = client
        self._timeout = client.timeout if timeout is None else timeout
        _ALIVE.append(self)

    @classmethod
    def from_env(cls, timeout: float = 300.0, prefix: str | None = None) -> AuthStore | None:
        """``prefix``: see :func:`launcher.store.connect_from_env` (default: this attempt's namespace)."""
        client = connect_from_env(timeout, prefix=prefix)
        return None if client is None else cls(client)

    # torch.distributed.Store API ---------------------------------------------------------
    def set(self, key, value):
        self._client.set(key, value)

    def get(self, key):
        try:
            return self._client.get(key, self._timeout)
        except StoreTimeout as exc:  # torch's callers expect its own timeout error type
            raise dist.DistStoreError(str(exc)) from None

    def add(self, key, value):
        return self._client.add(key, value)

    def compare_set(self, key, expected, desired):
        return self._client.compare_set(key, expected, desired)

    def check(self, keys):
        return self._client.check(list(keys))

    def wait(self, keys, timeout=None):
        try:
            self._client.wait(list(keys), self._timeout if timeout is None else _seconds(timeout))
        except StoreTimeout as exc:
            raise dist.DistStoreError(str(exc)) from None

    def delete_key(self, key):
        return self._client.delete_key(key)

    def num_keys(self):
        return self._client.num_keys()

    def append(self, key, value):
        self._client.append(key, value)

    def multi_get(self, keys):
        return self._client.multi_get(list(keys), self._timeout)

    def multi_set(self, keys, values):
        self._client.multi_set(list(keys), list(values))

    def set_timeout(self, timeout):
        self._timeout = _seconds(timeout)

    @property
    def timeout(self):
        return datetime.timedelta(seconds=self._timeout)

    def clone(self):
        c = self._client
        return AuthStore(StoreClient(c.address, c.secret, timeout=c.timeout, prefix=c.prefix, job=c.job), self._timeout)


def install_env_handler(rendezvous_module=None) -> None:
    """Route ``env://`` rendezvous to the launcher's store when the worker has one.

    Called by the bootstrap's import hook right after ``torch.distributed.rendezvous`` loads.
    Without ``DISTTRAIN_STORE`` in the environment torch's own handler stays in charge.
    """
    if rendezvous_module is None:
        import torch.distributed.rendezvous as rendezvous_module
    original = rendezvous_module._rendezvous_handlers.get("env")

    def env_handler(url: str, timeout: datetime.timedelta = datetime.timedelta(minutes=30), **kwargs):
        if not env_has_store():
            yield from original(url, timeout=timeout, **kwargs)
            return
        query = dict(p.split("=", 1) for p in url.partition("?")[2].split("&") if "=" in p)
        rank = int(query.get("rank", os.environ.get("RANK", "0")))
        world_size = int(query.get("world_size", os.environ.get("WORLD_SIZE", "1")))
        yield AuthStore(connect_from_env(_seconds(timeout)), _seconds(timeout)), rank, world_size
        raise RuntimeError("Unable to perform re-rendezvous using env:// method")

    rendezvous_module._rendezvous_handlers["env"] = env_handler

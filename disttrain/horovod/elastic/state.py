"""What survives a change of world: Horovod's ``State``, ``ObjectState`` and ``TorchState``.

    state = hvd.elastic.TorchState(model, optimizer, epoch=0, batch=0)
    state.register_reset_callbacks([lambda: scale_lr(hvd.size())])

Call order, every rank alike: ``commit()`` (a copy in this process's memory, then the same
check as ``check_host_updates()``), ``restore()`` (back to the last commit; ``elastic.run`` calls
it after a failed collective), ``sync()`` (rank 0's state to every rank; ``elastic.run`` calls it
at the start and after each reset, unless only hosts were removed). ``commit`` and
``check_host_updates`` are collective: rank 0's view of the driver's updates is broadcast, so
every rank raises :class:`HostsUpdatedInterrupt` at the same commit. The copies live in this
process only (the survivors hold them); a rank that joins gets them from rank 0 by ``sync()``.
"""

from __future__ import annotations

import copy
import queue
from collections.abc import Callable, Iterable

import torch

from .. import rendezvous
from ..exceptions import HostsUpdatedInterrupt
from ..functions import broadcast_object, broadcast_optimizer_state, broadcast_parameters
from ..ops import broadcast_
from .sampler import ElasticSampler


def _broadcast_from_0(obj):
    return broadcast_object(obj, root_rank=0, name="elastic.state")


class State:
    """The base: reset callbacks, the driver's notices, and the commit check. Subclasses give
    ``save``, ``restore`` and ``sync``."""

    def __init__(self, bcast_object: Callable | None = None):
        self._bcast_object = bcast_object or _broadcast_from_0
        self._reset_callbacks: list[Callable[[], None]] = []
        self._host_messages: queue.Queue = queue.Queue()  # (world version, added, removed), from the watch thread
        self._last_updated = -1  # the newest world this state has acted on

    def register_reset_callbacks(self, callbacks: Iterable[Callable[[], None]]) -> None:
        """Called, in order, after every reset (the new world is up, ``hvd.size()`` is its size)."""
        self._reset_callbacks.extend(callbacks)

    def on_reset(self) -> None:
        self._last_updated = max(self._last_updated, rendezvous.current_version())
        for callback in self._reset_callbacks:
            callback()

    def on_hosts_updated(self, version: int, added: bool, removed: bool) -> None:
        """The watch thread's notice of a new world (any thread)."""
        self._host_messages.put((version, added, removed))

    def commit(self) -> None:
        """All ranks: keep the current state as the one to go back to, then check for new hosts."""
        self.save()
        self.check_host_updates()

    def check_host_updates(self) -> None:
        """All ranks, collective: raise HostsUpdatedInterrupt when the driver published a newer world."""
        seen = max(self._last_updated, rendezvous.current_version())
        newest, added, removed = seen, False, False
        while True:
            try:
                version, a, r = self._host_messages.get_nowait()
            except queue.Empty:
                break
            if version > seen:
                newest, added, removed = max(newest, version), added or a, removed or r
        if rendezvous.enabled():  # rank 0's view wins, so every rank raises at this same commit
            view = torch.tensor([newest, added, removed], dtype=torch.int64)  # one op: it runs every commit
            newest, added, removed = broadcast_(view, 0, name="elastic.host_updates").tolist()
            added, removed = bool(added), bool(removed)
        self._last_updated = newest
        if newest > seen:
            raise HostsUpdatedInterrupt(skip_sync=removed and not added)

    def save(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError


class ObjectState(State):
    """Plain attributes (numbers, strings, lists, dicts: what ``broadcast_object`` moves), set from
    the keyword arguments: ``ObjectState(epoch=0, batch=0).epoch``."""

    def __init__(self, bcast_object: Callable | None = None, get_rank: Callable | None = None, **kwargs):
        super().__init__(bcast_object)
        self._saved_state = dict(kwargs)
        self._set_attrs()

    def _set_attrs(self) -> None:
        for name, value in self._saved_state.items():
            setattr(self, name, copy.deepcopy(value))

    def save(self) -> None:
        self._saved_state = {name: copy.deepcopy(getattr(self, name)) for name in self._saved_state}

    def restore(self) -> None:
        self._set_attrs()

    def sync(self) -> None:
        if self._saved_state:
            self._saved_state = dict(self._bcast_object(self._saved_state))
            self._set_attrs()


class _Model:
    def __init__(self, model: torch.nn.Module, name: str):
        self.value, self.name = model, name
        self.save()

    def save(self) -> None:
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        self.value.load_state_dict(self._saved)

    def sync(self) -> None:
        broadcast_parameters(self.value.state_dict(), root_rank=0, prefix=f"elastic.{self.name}.")

    def on_reset(self) -> None:
        pass


class _Optimizer:
    def __init__(self, optimizer: torch.optim.Optimizer, name: str):
        self.value, self.name = optimizer, name
        self.save()

    def save(self) -> None:
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        self.value.load_state_dict(self._saved)  # a DistributedOptimizer also drops pending allreduces

    def sync(self) -> None:
        broadcast_optimizer_state(self.value, root_rank=0)

    def on_reset(self) -> None:
        pass


class _Sampler:
    """An :class:`ElasticSampler`: its data position (epoch, processed count) kept and synced;
    re-dealt over the new world at every reset."""

    def __init__(self, sampler: ElasticSampler, name: str):
        self.value, self.name = sampler, name
        self.save()

    def save(self) -> None:
        self._saved = dict(self.value.state_dict())

    def restore(self) -> None:
        self.value.load_state_dict(self._saved)

    def sync(self) -> None:
        self.value.load_state_dict(_broadcast_from_0(self.value.state_dict()))

    def on_reset(self) -> None:
        self.value.reset()


class TorchState(ObjectState):
    """A model, an optimizer, and any other attributes: ``TorchState(model, optimizer, epoch=0)``.
    Keyword values that are modules or optimizers are kept by ``state_dict()`` too, an
    :class:`ElasticSampler` by its data position; the rest as in :class:`ObjectState`. ``state.model = other`` replaces the kept object."""

    def __init__(self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None, **kwargs):
        handlers: dict[str, _Model | _Optimizer | _Sampler] = {}
        rest = {}
        for name, value in {"model": model, "optimizer": optimizer, **kwargs}.items():
            if isinstance(value, torch.nn.Module):
                handlers[name] = _Model(value, name)
            elif isinstance(value, torch.optim.Optimizer):
                handlers[name] = _Optimizer(value, name)
            elif isinstance(value, ElasticSampler):
                handlers[name] = _Sampler(value, name)
            elif value is not None or name not in ("model", "optimizer"):
                rest[name] = value
        object.__setattr__(self, "_handlers", handlers)
        for name, handler in handlers.items():
            object.__setattr__(self, name, handler.value)
        super().__init__(**rest)

    def __setattr__(self, name: str, value) -> None:
        handler = self.__dict__.get("_handlers", {}).get(name)
        if handler is not None:
            handler.value = value
        object.__setattr__(self, name, value)

    def on_reset(self) -> None:
        for handler in self._handlers.values():
            handler.on_reset()
        super().on_reset()

    def save(self) -> None:
        for handler in self._handlers.values():
            handler.save()
        super().save()

    def restore(self) -> None:
        for handler in self._handlers.values():
            handler.restore()
        super().restore()

    def sync(self) -> None:
        for handler in self._handlers.values():
            handler.sync()
        super().sync()

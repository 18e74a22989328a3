"""Backend registry: a name maps to ``module:Class``, imported only when asked for.

Heavy imports (mpi4py, cupy) live inside the backend modules, so importing
``collectives`` stays cheap and a missing optional dependency only matters to the
user who names that backend.
"""

from __future__ import annotations

import importlib

from .errors import BackendUnavailableError

_BACKENDS: dict[str, str] = {
    "torch": "collectives.backends.torchdist:TorchBackend",
    "mpi": "collectives.backends.mpi.backend:MPIBackend",
    "nccl": "collectives.backends.nccl:NCCLBackend",
    "shm": "collectives.backends.shm.backend:ShmBackend",
    "horovod": "collectives.backends.horovod:HorovodBackend",
}


def register(name: str, target: str) -> None:
    """Register ``target`` (``"module:Class"``) under ``name``. Refuses duplicates."""
    if name in _BACKENDS and _BACKENDS[name] != target:
        raise BackendUnavailableError(
            f"backend {name!r} is already registered as {_BACKENDS[name]!r}; refusing to replace it with {target!r}"
        )
    _BACKENDS[name] = target


def known() -> list[str]:
    return sorted(_BACKENDS)


def get(name: str) -> type:
    """Return the backend class registered as ``name`` (imports its module)."""
    try:
        target = _BACKENDS[name]
    except KeyError:
        raise BackendUnavailableError(
            f"unknown collectives backend {name!r}; known backends: {', '.join(known())}\n"
            "HINT: did you forget to call collectives.registry.register()?"
        ) from None
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend {name!r} cannot be imported ({exc})\n"
            f"HINT: install its extra, e.g. pip install 'disttrain[{name}]'"
        ) from exc
    return getattr(module, cls_name)


def available() -> list[str]:
    """Names of the backends whose ``is_available()`` is true on this machine."""
    out = []
    for name in known():
        try:
            if get(name).is_available():
                out.append(name)
        except BackendUnavailableError:
            continue
    return out

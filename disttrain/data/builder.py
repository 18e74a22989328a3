"""Build the ``data`` config section: a built-in kind (a registry entry) or the user's ``data.target``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch.utils.data import IterableDataset

from ..errors import DisttrainError
from ..targets import TargetError, UserCodeError, call_target, import_target
from .dataset import Data
from .task import Task

if TYPE_CHECKING:
    from ..config.data import DigitsData, ShakespeareData, TargetData

# The built-in kinds: data.kind -> "module:function", a builder(section, seed, seq_len) -> Task. The demo
# datasets live in disttrain.examples, imported only when a config names one.
TASKS: dict[str, str] = {
    "digits": "disttrain.examples.digits:task",
    "shakespeare": "disttrain.examples.shakespeare:task",
}


def build_task(cfg: DigitsData | ShakespeareData, seed: int, seq_len: int | None = None) -> Task:
    """The in-memory task of a built-in ``data`` section (``kind: digits|shakespeare``)."""
    try:
        entry = TASKS[cfg.kind]
    except KeyError:
        raise DisttrainError(f"unknown data kind {cfg.kind!r}; known: {', '.join(TASKS)}") from None
    try:
        builder = import_target(entry)
    except TargetError as exc:
        raise DisttrainError(f"data.kind {cfg.kind!r}: {exc}") from None
    return builder(cfg, seed, seq_len)


@runtime_checkable
class MapDataset(Protocol):
    """What the trainer needs of a dataset: its length and a sample by index (torch's map-style Dataset)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


def _is_dataset(obj: Any) -> bool:
    return isinstance(obj, (MapDataset, IterableDataset))


def build_target_data(cfg: TargetData, import_path: list[str]) -> Data:
    """Call ``data.target(**data.kwargs)``; it must return ``(train, eval)`` datasets: map-style, or
    streams (``IterableDataset``, which need ``train.steps``)."""
    out = call_target("data.target", cfg.target, import_path, **cfg.kwargs)
    pair = out if isinstance(out, (tuple, list)) and len(out) == 2 else None
    if pair is None or not _is_dataset(pair[0]) or not (pair[1] is None or _is_dataset(pair[1])):
        raise UserCodeError(
            f"data.target {cfg.target!r} returned {type(out).__name__}, expected (train, eval): two Datasets, "
            "map-style (with __len__ and __getitem__) or torch IterableDatasets (streams); eval may be None"
        )
    collate = import_target(cfg.collate, import_path) if cfg.collate else None
    return Data(pair[0], pair[1], collate)

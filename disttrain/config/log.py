"""The ``log:`` section (trackers and the metrics line), ``profile:`` and the ``callbacks:`` list."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from .section import TARGET_PATTERN, Section


class LogConfig(Section):
    trackers: list[Literal["tensorboard", "wandb", "mlflow", "csv"]] = Field(
        [],
        description="Where metrics go beside RUN_DIR/metrics.jsonl (rank 0 writes): tensorboard, wandb, mlflow, "
        "csv. The libraries come with the `trackers` extra: pip install 'disttrain[trackers]'.",
    )
    project: str | None = Field(None, description="W&B project / MLflow experiment (default: run.name).")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="W&B mode: offline writes RUN_DIR/wandb/offline-run-* (`wandb sync` uploads it)."
    )
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI (default: sqlite:///RUN_DIR/mlflow.db, a local store)."
    )
    tensorboard_dir: str | None = Field(None, description="TensorBoard event directory (default: RUN_DIR/tensorboard).")
    throughput: bool = Field(
        True,
        description="Step time split (data, forward+backward, communication, optimizer), speed per device, peak "
        "memory per rank, ETA, TFLOPs and MFU on each metrics line (one small allgather per line).",
    )
    stragglers: bool = Field(
        True,
        description="Name the rank that arrives last at each step's first collective (flight recorder arrival "
        "times; one small allgather per metrics line): straggler_rank, straggler_lag_s, straggler_host.",
    )
    straggler_threshold_s: float = Field(
        0.01, gt=0, description="A step's last rank counts as a straggler when it arrives later than this."
    )
    flops_per_sample: float | None = Field(
        None,
        gt=0,
        description="Training FLOPs of one sample, for TFLOPs and MFU (default: 6N per token plus attention for "
        "the built-in GPT and transformers decoders, from the model's config and each batch's sequence length; "
        "unknown otherwise).",
    )

    @model_validator(mode="after")
    def _trackers_installed(self) -> LogConfig:
        from ..observe.trackers import missing  # finds the libraries without importing them

        problems = [why for why in map(missing, dict.fromkeys(self.trackers)) if why]
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ProfileConfig(Section):
    steps: tuple[int, int] | None = Field(
        None, description="[first, last] optimizer steps (1-based, inclusive) to record with torch.profiler; none: off."
    )
    ranks: list[Annotated[int, Field(ge=0)]] = Field([0], description="Ranks that record a profile.")
    record_shapes: bool = Field(False, description="Record the input shapes of each op (bigger traces).")

    @model_validator(mode="after")
    def _ordered(self) -> ProfileConfig:
        if self.steps is not None and not 1 <= self.steps[0] <= self.steps[1]:
            raise ValueError(f"steps {list(self.steps)}: expected [first, last] with 1 <= first <= last")
        return self


class CallbackConfig(Section):
    target: str = Field(
        description="A built-in callback (early_stopping, best_checkpoint) or 'package.module:Class' of a "
        "disttrain.Callback subclass."
    )
    kwargs: dict[str, Any] = Field({}, description="Keyword arguments of the class.")

    @model_validator(mode="after")
    def _known_target(self) -> CallbackConfig:
        from ..observe.callbacks import BUILTIN

        if self.target not in BUILTIN and not re.match(TARGET_PATTERN, self.target):
            raise ValueError(
                f"got {self.target!r}, expected one of {', '.join(BUILTIN)} or an import target 'package.module:Class'"
            )
        return self

"""TensorBoard: event files in ``RUN_DIR/tensorboard`` (``log.tensorboard_dir``) through
``torch.utils.tensorboard.SummaryWriter``; the config, layout and git revision as text once, and
each metrics line as one event holding every scalar (one ``Summary`` with a value per name, what
TensorBoard's readers take as that step's scalars): rank 0 writes it on the step path, where an
``add_scalar`` per name costs a ``Summary``, an ``Event`` and a serialisation apiece."""

from __future__ import annotations

import json
import os

import yaml
from tensorboard.compat.proto.summary_pb2 import Summary


class TensorBoardTracker:
    def __init__(self, log_cfg, run_dir: str, run_name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_cfg.tensorboard_dir or os.path.join(run_dir, "tensorboard"))

    def log_run(self, config: dict, layout: dict, git: str | None) -> None:
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "\n```", 0)
        self.writer.add_text("layout", "```\n" + json.dumps(layout, indent=2) + "\n```", 0)
        self.writer.add_text("git", git or "unknown", 0)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        values = [Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()]
        self.writer.file_writer.add_summary(Summary(value=values), step)

    def close(self, failed: bool = False) -> None:
        self.writer.flush()
        self.writer.close()

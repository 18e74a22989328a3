"""Weights & Biases: a run in ``RUN_DIR/wandb`` through ``wandb.init``; offline by default
(``log.wandb_mode``: files a later ``wandb sync`` uploads), online when asked. The config, the
layout and the git revision are the run's config; metrics are logged at their step."""

from __future__ import annotations


class WandbTracker:
    def __init__(self, log_cfg, run_dir: str, run_name: str):
        import wandb

        self.wandb = wandb
        self.cfg, self.run_dir, self.run_name = log_cfg, run_dir, run_name
        self.run = None

    def log_run(self, config: dict, layout: dict, git: str | None) -> None:
        self.run = self.wandb.init(
            project=self.cfg.project or self.run_name,
            name=self.run_name,
            dir=self.run_dir,
            mode=self.cfg.wandb_mode,
            config={**config, "layout": layout, "git": git},
            reinit="create_new",
        )

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None

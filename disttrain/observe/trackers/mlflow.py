"""MLflow: a run in the tracking store ``log.mlflow_uri`` (default ``sqlite:///RUN_DIR/mlflow.db``,
offline), experiment ``log.project`` (default ``run.name``), artifacts under ``RUN_DIR/mlflow``.
The config and layout are logged as JSON artifacts, the git revision as a tag, and the layout's
numbers as parameters."""

from __future__ import annotations

import os
import time


class MlflowTracker:
    def __init__(self, log_cfg, run_dir: str, run_name: str):
        from mlflow.tracking import MlflowClient

        uri = log_cfg.mlflow_uri or "sqlite:///" + os.path.abspath(os.path.join(run_dir, "mlflow.db"))
        self.client = MlflowClient(tracking_uri=uri)
        name = log_cfg.project or run_name
        exp = self.client.get_experiment_by_name(name)
        artifacts = "file://" + os.path.abspath(os.path.join(run_dir, "mlflow"))
        self.exp_id = exp.experiment_id if exp else self.client.create_experiment(name, artifact_location=artifacts)
        self.run_id = self.client.create_run(self.exp_id, run_name=run_name).info.run_id

    def log_run(self, config: dict, layout: dict, git: str | None) -> None:
        self.client.log_dict(self.run_id, config, "config.json")
        self.client.log_dict(self.run_id, layout, "layout.json")
        for k, v in layout.items():
            if isinstance(v, (int, float, str)):
                self.client.log_param(self.run_id, k, v)
        self.client.set_tag(self.run_id, "git", git or "unknown")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")

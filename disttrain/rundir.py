"""The run directory: resolved config, metrics.jsonl, summary.json, loss.png and logs.

Only rank 0 writes here (logs are written by the launcher). Files are replaced atomically.
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)


class RunDir:
    def __init__(self, path: str, rank: int):
        self.path, self.rank = path, rank
        if rank == 0:
            os.makedirs(path, exist_ok=True)
        self._metrics = open(os.path.join(path, "metrics.jsonl"), "a") if rank == 0 else None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def log_metrics(self, record: dict) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def write_json(self, name: str, data: dict) -> None:
        if self.rank != 0:
            return
        tmp = self.file(name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, self.file(name))

    def read_metrics(self) -> list[dict]:
        try:
            with open(self.file("metrics.jsonl")) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def plot_loss(self) -> bool:
        """loss.png from metrics.jsonl (rank 0); skipped with a logged note where matplotlib, an
        optional extra (``disttrain[plot]``), is not installed. Returns whether the file was written."""
        if self.rank != 0:
            return False
        rows = [r for r in self.read_metrics() if "loss" in r]
        if not rows:
            return False
        try:
            import matplotlib
        except ImportError:
            log.info("loss.png skipped: matplotlib is not installed (pip install 'disttrain[plot]' to get it)")
            return False

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
        evals = [r for r in rows if "eval_loss" in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.file("loss.png"), dpi=100)
        plt.close(fig)
        return True

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

"""The run directory: resolved config, metrics.jsonl, summary.json, loss.png and logs.

Only rank 0 writes here (logs are written by the launcher). Files are replaced atomically.
"""

from __future__ import annotations

import json
import os


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

    def resume_metrics(self, step: int) -> None:
        """A run resumed at ``step`` (rank 0): lines after it, which the resumed run writes again,
        leave metrics.jsonl (each step's line once), and a marker line records the resume."""
        if self._metrics is None:
            return
        self._metrics.close()
        kept = [r for r in self.read_metrics() if not isinstance(r.get("step"), int) or r["step"] <= step]
        tmp = self.file("metrics.jsonl.tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
            f.write(json.dumps({"event": "resume", "step": step}) + "\n")
        os.replace(tmp, self.file("metrics.jsonl"))
        self._metrics = open(self.file("metrics.jsonl"), "a")

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

    def plot_loss(self) -> None:
        """loss.png from metrics.jsonl (rank 0): training loss and every evaluation point."""
        if self.rank != 0:
            return
        records = self.read_metrics()
        rows = [r for r in records if "loss" in r]
        if not rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
        evals = [r for r in records if "eval_loss" in r and isinstance(r.get("step"), int)]
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

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

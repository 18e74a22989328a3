"""CSV: ``RUN_DIR/metrics.csv``, one row per metrics line, a column per name (stdlib only).

A name that first appears later (an evaluation, a user metric) widens the header: the file is
rewritten with the new columns, earlier rows left empty there.
"""

from __future__ import annotations

import csv
import json
import os


def _filled(row: dict) -> set[str]:
    return {k for k, v in row.items() if k != "step" and v not in (None, "")}


class CsvTracker:
    def __init__(self, log_cfg, run_dir: str, run_name: str):
        self.path = os.path.join(run_dir, "metrics.csv")
        self.columns: list[str] = ["step"]
        self.rows: list[dict] = []
        if os.path.exists(self.path):  # a resumed run continues the same file
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = list(reader)
        self.run_dir = run_dir

    def log_run(self, config: dict, layout: dict, git: str | None) -> None:
        with open(os.path.join(self.run_dir, "run_info.json"), "w") as f:
            json.dump({"config": config, "layout": layout, "git": git}, f, indent=2)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        last = self.rows[-1] if self.rows else None
        if last is not None and int(float(last.get("step") or -1)) == step and not set(metrics) & _filled(last):
            last.update(metrics)  # more of the same step's line (the final evaluation of a stopped run)
            self.columns += [k for k in metrics if k not in self.columns]
            self._rewrite()
            return
        # A resumed run replays steps after its checkpoint: the newer row replaces the older.
        before = len(self.rows)
        self.rows = [r for r in self.rows if int(float(r.get("step") or -1)) < step]
        dropped = len(self.rows) != before
        row = {"step": step, **metrics}
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new or dropped or len(self.rows) == 1:
            self.columns += new
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(row)

    def _rewrite(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self.columns)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)

    def close(self, failed: bool = False) -> None:
        pass

"""CSV: ``RUN_DIR/metrics.csv``, one row per metrics line, a column per name (stdlib only).

A name that first appears later (an evaluation, a user metric) widens the header: the file is
rewritten with the new columns, earlier rows left empty there. Files go through
:mod:`disttrain.rundir` (a shared-group run directory lets the group plant entries): rewrites by a
fresh temporary renamed over the name, appends and the resumed read with ``O_NOFOLLOW`` on a
regular file of ours, so a planted symlink is replaced or refused, never followed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat

from ... import rundir


def _read_own(path: str) -> str | None:
    """``path``'s text when it exists: a regular file of ours, a symlink not followed (RunDirError)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise rundir.RunDirError(f"{path}: cannot read ({exc.strerror}); a symlink is not followed") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise rundir.RunDirError(f"{path}: not a regular file of yours; not read")
        return f.read().decode()


def _filled(row: dict) -> set[str]:
    return {k for k, v in row.items() if k != "step" and v not in (None, "")}


class CsvTracker:
    def __init__(self, log_cfg, run_dir: str, run_name: str):
        self.path = os.path.join(run_dir, "metrics.csv")
        self.columns: list[str] = ["step"]
        self.rows: list[dict] = []
        text = _read_own(self.path)
        if text is not None:  # a resumed run continues the same file
            reader = csv.DictReader(io.StringIO(text, newline=""))
            self.columns = list(reader.fieldnames or ["step"])
            self.rows = list(reader)
        self.run_dir = run_dir

    def log_run(self, config: dict, layout: dict, git: str | None) -> None:
        info = json.dumps({"config": config, "layout": layout, "git": git}, indent=2)
        rundir.write_atomic(os.path.join(self.run_dir, "run_info.json"), info.encode())

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
            buf = io.StringIO(newline="")
            csv.DictWriter(buf, self.columns).writerow(row)
            with rundir.open_append(self.path) as f:
                f.write(buf.getvalue().encode())

    def _rewrite(self) -> None:
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, self.columns)
        w.writeheader()
        w.writerows(self.rows)
        rundir.write_atomic(self.path, buf.getvalue().encode())

    def close(self, failed: bool = False) -> None:
        pass

"""The README's main job, end to end, through the CLI and the launcher."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_digits_job_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "disttrain.cli", "run", "configs/digits.yaml", f"run.dir={run_dir}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[0@" in proc.stdout and "done:" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 400
    assert summary["final_eval_accuracy"] >= 0.95, summary
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 400
    assert all({"loss", "lr", "samples_per_s", "grad_norm"} <= m.keys() for m in metrics if "loss" in m)
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert (run_dir / "config.yaml").exists()
    for rank in (0, 1):
        assert (run_dir / "logs" / f"rank_{rank}" / "stdout.log").exists()

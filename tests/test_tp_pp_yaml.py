"""From YAML alone: a transformers Llama by ``model.target`` trained under tp2 x pp2 (interleaved)
by ``disttrain run`` equals the same YAML on one process; a bad plan is exit 2 naming the key,
the glob and the module type.

Tolerance: final loss within 1e-4 (3 steps, fp32; the layouts differ in summation order only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = {
    "run": {"name": "tp-pp-yaml", "seed": 0},
    "launch": {"nproc": 1, "backend": "torch"},
    "model": {"target": "tests.cases.mp_models:llama_model"},
    "data": {"target": "tests.cases.mp_models:token_data", "kwargs": {"n": 64}},
    "optim": {"name": "AdamW", "lr": 3.0e-3, "kwargs": {"eps": 1.0e-6}},
    "schedule": {"kind": "constant"},
    "train": {"steps": 3, "batch_size": 8, "log_every": 1, "eval_every": 0},
    "checkpoint": {"enabled": False},
}


def _run(tmp_path, name: str, overrides: list[str]) -> subprocess.CompletedProcess:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "disttrain.cli", "run", str(cfg), f"run.dir={tmp_path / name}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(900)
def test_yaml_tp2_pp2_interleaved_equals_one_process_and_bad_plan_exits_2(tmp_path):
    mesh = ["--nproc", "4", "parallel.mesh.tp=2", "parallel.mesh.pp=2", "parallel.pipeline.schedule=interleaved"]
    mesh += ["parallel.pipeline.virtual_stages=2", "parallel.pipeline.microbatches=2"]
    par = _run(tmp_path, "tp2pp2", mesh)
    assert par.returncode == 0, par.stderr[-3000:]
    one = _run(tmp_path, "one", [])
    assert one.returncode == 0, one.stderr[-3000:]
    a = json.loads((tmp_path / "tp2pp2" / "summary.json").read_text())
    b = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert a["world_size"] == 4 and a["steps"] == 3
    assert abs(a["final_loss"] - b["final_loss"]) <= 1e-4, (a["final_loss"], b["final_loss"])
    assert abs(a["final_eval_loss"] - b["final_eval_loss"]) <= 1e-4, (a, b)

    bad = _run(
        tmp_path, "bad", ["--nproc", "2", "parallel.mesh.tp=2", "parallel.tp.plan={model.layers.*.atn.q: colwise}"]
    )
    assert bad.returncode == 2, (bad.returncode, bad.stderr[-3000:])
    for word in ("parallel.tp.plan", "'model.layers.*.atn.q'", "matches no module of LlamaForCausalLM"):
        assert word in bad.stderr, bad.stderr[-3000:]
    assert "Traceback" not in bad.stderr

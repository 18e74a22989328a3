"""What a job shows, in real rank processes: the user's metrics reduced across 2 and 3 ranks and
read back with each tracker's own reader (TensorBoard's event reader, the CSV, MLflow's client on
a local sqlite store, wandb's offline run inspected by the wandb CLI); callbacks in order, early
stopping, the best checkpoint; a user's and a YAML scheduler against plain torch, across a resume;
metrics.jsonl once per step across a crash and resume; a re-run of a finished run changing nothing.
Tolerances: 1e-9 relative on reduced metrics (float64 sums), 1e-12 on learning rates."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.support.harness import RankFailure, spawn

pytestmark = pytest.mark.timeout(600)

YAML = """
run: {{dir: {dir}, seed: 3}}
launch: {{backend: torch, timeout: 60}}
train: {{steps: {steps}, batch_size: 6, grad_accum: 1, log_every: {log_every}, eval_every: {eval_every}, eval_samples: 8}}
schedule: {schedule}
optim: {{name: AdamW, lr: 0.01}}
checkpoint: {{enabled: {ckpt}, every: {every}, keep: 1, async_save: false}}
log: {{trackers: {trackers}}}
"""


def _config(
    tmp_path, name, steps=4, log_every=2, eval_every=0, ckpt=False, every=0, trackers=(), extra="", schedule=None
):
    path = tmp_path / f"{name}.yaml"
    text = YAML.format(
        dir=tmp_path / name,
        steps=steps,
        log_every=log_every,
        eval_every=eval_every,
        ckpt=str(ckpt).lower(),
        every=every,
        trackers=json.dumps(list(trackers)),
        schedule=schedule or "{kind: constant}",
    )
    path.write_text(text + extra)
    return str(path)


def _jsonl(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_run_log_and_step_metrics_reduced_over_three_ranks(tmp_path):
    config = _config(tmp_path, "three", steps=4, log_every=2, trackers=["csv", "tensorboard"])
    profile = ["profile.steps=[2, 3]", "profile.ranks=[0, 2]"]
    res = spawn("tests.cases.observe:own_loop", 3, args={"config": config, "overrides": profile})
    lines = [r for r in res[0]["history"] if "loss" in r]
    assert [r["step"] for r in lines] == [2, 4]
    for rec in lines:
        assert _close(rec["r"], 1.0) and rec["r_max"] == 2 and rec["r_min"] == 0 and rec["declared"] == 2
        assert _close(rec["one_sum"], 3.0)  # summed over 3 ranks each step, averaged over the window
        assert _close(rec["at"], rec["step"] - 1.5)  # the mean of steps 0,1 (2,3) over the window
        assert _close(rec["all"], 1.0) and rec["rank_max"] == 2  # the step function's, per unit / max
        assert rec["only0"] == 7.0  # logged on rank 0 only: the mean over the ranks that logged it
    for other in res[1:]:  # every rank computes the same line
        assert [(r["r"], r["one_sum"]) for r in other["history"]] == [(r["r"], r["one_sum"]) for r in lines]
    run_dir = tmp_path / "three"
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert _close(float(rows[0]["one_sum"]), 3.0) and float(rows[1]["r_max"]) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("r_max")] == [(2, 2.0), (4, 2.0)]
    assert _close(acc.Scalars("one_sum")[1].value, 3.0)
    assert {"config/text_summary", "layout/text_summary", "git/text_summary"} <= set(acc.Tags()["tensors"])
    # The profiles of ranks 0 and 2 open as JSON (Chrome trace format) with the collectives named.
    assert sorted(os.listdir(run_dir / "profiles")) == ["rank0.trace.json", "rank2.trace.json"]
    for name in ("rank0.trace.json", "rank2.trace.json"):
        with open(run_dir / "profiles" / name) as f:
            events = json.load(f)["traceEvents"]
        labels = {e["name"] for e in events if e.get("name", "").startswith("allreduce#")}
        assert any(n.endswith("(world)") for n in labels), sorted(labels)[:5]


def test_fit_metrics_reach_every_tracker_on_two_ranks(tmp_path):
    trackers = ["tensorboard", "wandb", "mlflow", "csv"]
    config = _config(tmp_path, "two", steps=4, log_every=2, eval_every=2, trackers=trackers)
    record = str(tmp_path / "calls.json")
    res = spawn("tests.cases.observe:fit", 2, args={"config": config, "overrides": [], "record": record})
    summary = res[0]["summary"]
    lines = {r["step"]: r for r in summary["history"]}
    assert set(lines) == {2, 4}
    for rec in lines.values():
        assert _close(rec["all"], 1.0) and rec["rank_max"] == 1 and "eval_loss" in rec
        assert {"step_time_s", "data_wait_s", "comm_wait_s", "optimizer_s", "eta_s", "mem_peak_gb"} <= rec.keys()
        assert len(rec["mem_peak_gb_per_rank"]) == 2 and rec["samples_per_s_per_device"] > 0
    run_dir = str(tmp_path / "two")
    # MLflow: its client on the local sqlite store.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="sqlite:///" + os.path.join(run_dir, "mlflow.db"))
    exp = client.get_experiment_by_name("experiment")
    (run,) = client.search_runs([exp.experiment_id])
    hist = client.get_metric_history(run.info.run_id, "rank_max")
    assert sorted((m.step, m.value) for m in hist) == [(2, 1.0), (4, 1.0)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")][-1] == 4
    assert run.data.tags["git"] and run.data.params["world_size"] == "2" and run.info.status == "FINISHED"
    # W&B: the offline run, read back by wandb's own inspector.
    wandb_bin = os.path.join(os.path.dirname(sys.executable), "wandb")
    out = subprocess.run(
        [wandb_bin, "leet", "inspect", "--summary", "--json", os.path.join(run_dir, "wandb")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    wb = json.loads(out)
    assert wb["summary"]["rank_max"] == 1 and wb["summary"]["_step"] == 4 and wb["state"] == "finished"
    assert wb["config"]["layout"]["world_size"] == 2 and wb["config"]["train"]["steps"] == 4
    # TensorBoard and CSV.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval_loss")] == [2, 4]
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 4]


def test_callbacks_in_order_early_stopping_and_best_checkpoint(tmp_path):
    extra = """
callbacks:
  - {target: best_checkpoint, kwargs: {monitor: eval_loss}}
  - {target: early_stopping, kwargs: {monitor: calls_max, mode: min, patience: 2}}
"""
    config = _config(tmp_path, "cb", steps=10, log_every=1, eval_every=1, ckpt=True, every=0, extra=extra)
    record = str(tmp_path / "calls.json")
    res = spawn("tests.cases.observe:fit", 2, args={"config": config, "overrides": [], "record": record})
    summary = res[0]["summary"]
    # calls_max only grows: the first line is the best, two worse ones later the run stops.
    assert summary["steps"] == 3 and summary["stopped_early"] and summary["early_stopped_at"] == 3
    with open(record) as f:
        calls = json.load(f)["calls"]
    assert calls[0] == "on_train_start" and calls[-1] == "on_train_end"
    steps = [c for c in calls if c in ("before_optimizer_step", "on_eval_end", "on_step_end")]
    assert steps == ["before_optimizer_step", "on_eval_end", "on_step_end"] * 3
    evals = {r["step"]: r["eval_loss"] for r in summary["history"]}
    best_step = min(evals, key=evals.get)
    run_dir = tmp_path / "cb"
    with open(run_dir / "checkpoints" / "best.json") as f:
        best = json.load(f)
    assert best["step"] == best_step and _close(best["value"], evals[best_step])
    assert os.path.isdir(best["path"])  # kept although checkpoint.keep is 1
    assert f"on_checkpoint:{best_step}:step_{best_step:06d}" in calls
    assert summary["best_checkpoint"]["step"] == best_step
    # A callback that raises: on_exception is called, and the rank fails with the error.
    failing = _config(tmp_path, "fail", steps=4, log_every=1)
    with pytest.raises(RankFailure) as info:
        spawn("tests.cases.observe:fit", 1, args={"config": failing, "overrides": [], "record": record, "fail_at": 2})
    assert "injected failure after step 2" in str(info.value)
    with open(record) as f:
        assert json.load(f)["calls"][-1] == "on_exception:RuntimeError"


def _torch_lrs(make, steps: int, lr: float = 0.01) -> list[float]:
    """Plain torch: the learning rate each of ``steps`` optimizer steps uses."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched, out = make(opt), []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedulers_match_torch_and_resume_where_they_were(tmp_path):
    # The user's own scheduler in the own loop: lr after each step, then resumed for two more.
    config = _config(tmp_path, "user", steps=3, log_every=1, ckpt=True)
    first = spawn("tests.cases.observe:own_loop", 2, args={"config": config, "overrides": [], "step_lr": True})
    again = spawn(
        "tests.cases.observe:own_loop", 2, args={"config": config, "overrides": ["train.steps=5"], "step_lr": True}
    )
    expect = _torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5), 6)[1:]  # after steps 1..5
    got = first[0]["lrs"] + again[0]["lrs"]
    assert len(got) == 5 and all(_close(a, b) for a, b in zip(got, expect)), (got, expect)
    # A YAML scheduler with warmup through fit: the lr each step uses, across a resume.
    schedule = "{name: CosineAnnealingLR, kwargs: {T_max: 6}, warmup_steps: 2}"
    yaml_cfg = _config(tmp_path, "yaml", steps=3, log_every=1, ckpt=True, schedule=schedule)
    rec1, rec2 = str(tmp_path / "lr1.json"), str(tmp_path / "lr2.json")
    spawn("tests.cases.observe:fit", 2, args={"config": yaml_cfg, "overrides": [], "record": rec1})
    spawn("tests.cases.observe:fit", 2, args={"config": yaml_cfg, "overrides": ["train.steps=6"], "record": rec2})
    from torch.optim import lr_scheduler

    def warm_cosine(o):
        warm = lr_scheduler.LinearLR(o, start_factor=0.5, end_factor=1.0, total_iters=1)
        return lr_scheduler.SequentialLR(o, [warm, lr_scheduler.CosineAnnealingLR(o, T_max=6)], milestones=[2])

    expect = _torch_lrs(warm_cosine, 6)
    got = [json.load(open(p))["lrs"] for p in (rec1, rec2)]
    assert all(_close(a, b) for a, b in zip(got[0] + got[1], expect)) and len(got[0] + got[1]) == 6, (got, expect)


def _plateau_lrs(values: list[float], lr: float = 0.01) -> list[float]:
    """Plain torch: ReduceLROnPlateau(mode=max, patience=1, factor=0.5) stepped with ``values`` in
    turn; the learning rate in force before each value (the rate of the step that produced it)."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched, out = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=1, factor=0.5), []
    for v in values:
        out.append(opt.param_groups[0]["lr"])
        sched.step(v)
    out.append(opt.param_groups[0]["lr"])
    return out


def test_reduce_lr_on_plateau_matches_torch_and_resumes_its_counters(tmp_path):
    # YAML, through fit, on the default monitor (eval_loss, every step): 4 steps, then resumed to 7. With
    # mode max a falling loss is a bad line, so the rate halves every second one; the resume falls between
    # two bad lines (step 4 is the first after the halving at 3), so lost counters would show at step 5.
    schedule = "{name: ReduceLROnPlateau, kwargs: {mode: max, patience: 1, factor: 0.5}}"
    config = _config(tmp_path, "plateau", steps=4, log_every=1, eval_every=1, ckpt=True, schedule=schedule)
    rec1, rec2 = str(tmp_path / "p1.json"), str(tmp_path / "p2.json")
    spawn("tests.cases.observe:fit", 2, args={"config": config, "overrides": [], "record": rec1})
    spawn("tests.cases.observe:fit", 2, args={"config": config, "overrides": ["train.steps=7"], "record": rec2})
    lines = [r for r in _jsonl(tmp_path / "plateau") if "event" not in r]
    assert [r["step"] for r in lines] == list(range(1, 8))
    expect = _plateau_lrs([r["eval_loss"] for r in lines])[:7]  # the rate each of the 7 steps used
    got = [json.load(open(p))["lrs"] for p in (rec1, rec2)]
    assert len(set(expect)) >= 3, expect  # it did reduce, more than once
    assert len(got[0] + got[1]) == 7 and all(_close(a, b) for a, b in zip(got[0] + got[1], expect)), (got, expect)
    # The own loop with the user's ReduceLROnPlateau on the training loss: the rate after each step.
    config = _config(tmp_path, "own", steps=3, log_every=1, ckpt=True, extra="")
    args = {"config": config, "overrides": ["schedule.monitor=loss"], "plateau": True}
    first = spawn("tests.cases.observe:own_loop", 2, args=args)
    again = spawn("tests.cases.observe:own_loop", 2, args={**args, "overrides": args["overrides"] + ["train.steps=6"]})
    losses = [r["loss"] for r in _jsonl(tmp_path / "own") if "event" not in r]
    expect = _plateau_lrs(losses)[1:]  # after each step
    got = first[0]["lrs"] + again[0]["lrs"]
    assert len(losses) == 6 and len(got) == 6 and all(_close(a, b) for a, b in zip(got, expect)), (got, expect)


def test_metrics_once_per_step_across_resume_and_finished_rerun(tmp_path):
    config = _config(tmp_path, "resume", steps=4, log_every=1, ckpt=True, every=2)
    record = str(tmp_path / "calls.json")
    crash = {"DISTTRAIN_CKPT_TEST_HOOK": "kill@step_end:0:3"}  # rank 0 dies after step 3's line
    with pytest.raises(RankFailure):
        spawn("tests.cases.observe:fit", 2, args={"config": config, "overrides": [], "record": record}, env=crash)
    run_dir = tmp_path / "resume"
    assert [r["step"] for r in _jsonl(run_dir)] == [1, 2, 3]
    env = {"DISTTRAIN_RESTART_COUNT": "1"}
    spawn("tests.cases.observe:fit", 2, args={"config": config, "overrides": [], "record": record}, env=env)
    recs = _jsonl(run_dir)
    assert [r.get("event") for r in recs] == [None, None, "resume", None, None]
    steps = [r["step"] for r in recs if "event" not in r]
    assert steps == [1, 2, 3, 4] and "eval_loss" in recs[-1]  # the final evaluation is on step 4's line
    before = {n: (run_dir / n).read_bytes() for n in ("summary.json", "metrics.jsonl")}
    res = spawn("tests.cases.observe:fit", 2, args={"config": config, "overrides": [], "record": record})
    assert res[0]["summary"]["already_finished"] is True
    assert {n: (run_dir / n).read_bytes() for n in before} == before


def test_a_slow_rank_is_named_with_its_host(tmp_path):
    config = _config(tmp_path, "slow", steps=6, log_every=3)
    res = spawn("tests.cases.observe:fit_slow", 2, args={"config": config, "overrides": []})
    lines = [r for r in _jsonl(tmp_path / "slow") if "loss" in r]
    assert [r["step"] for r in lines] == [3, 6]
    for rec in lines:
        assert rec["straggler_rank"] == 1 and rec["slow_steps"] >= 2, rec
        assert 0.03 < rec["straggler_lag_s"] < 1.0 and rec["straggler_host"], rec
    assert res[0]["summary"]["steps"] == 6

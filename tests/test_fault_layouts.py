"""Losing a host under tensor and pipeline parallelism, with peer replicas on
(``fault_tolerance.every=1``): network namespaces as hosts, each started torchrun-style with
``--nnodes 1:2`` and two workers (tests/test_launcher_elastic.py's harness).

2 hosts x 2 workers, dp2 x tp2 (or dp2 x pp2); host 1 SIGKILLed (agent and workers) mid-run. The
survivor's two new workers form tp2 (pp2) at dp1 and load the tp/pp shards of all four old ranks
from the copies in the surviving agent's memory: nothing read from disk (``checkpoint.every=0``:
no checkpoint exists before the end), at most one step lost, and the run ends where a run that
changed from four ranks to two at the same step through a disk checkpoint ends (same global batch).
"""

from __future__ import annotations

import os
import re

import pytest

from disttrain import config as config_mod
from tests.support.host_loss import lose_host_1
from tests.support.resized import check_equals_resized_run, run_until
from tests.support.resized import run_to_end as _run
from tests.test_launcher_elastic import ROOT, _no_netns

pytestmark = pytest.mark.skipif(_no_netns() is not None, reason=f"multi-host tests skipped: {_no_netns()}")
RESUMED = r"resumed from peer memory at step (\d+) \(\d+ bytes\), 0 from disk \(restart 1\)"
TOL = 1e-5  # parameters; the reference runs the same steps on the same layout in other processes
TINY_GPT = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=32",
    "model.seq_len=16",
    "data.plays=[macbeth_gut]",
    "train.batch_size=8",
    "launch.backend=torch",
]
LAYOUTS = {"tp2": ["parallel.mesh.tp=2"], "pp2": ["parallel.mesh.pp=2", "parallel.pipeline.microbatches=2"]}


def _config(tmp_path, name: str, steps: int, extra: list[str]) -> str:
    overrides = [
        f"run.dir={tmp_path / name}",
        f"train.steps={steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "checkpoint.keep=1000",
        *TINY_GPT,
        *extra,
    ]
    cfg = config_mod.load(os.path.join(ROOT, "configs", "gpt-shakespeare.yaml"), overrides)
    path = str(tmp_path / f"{name}.yaml")
    config_mod.save(cfg, path)
    return path


def _lose_host(tmp_path, run_yaml: str, nproc: int) -> tuple[int, str, str, float]:
    """Two hosts of ``nproc`` workers each; host 1 SIGKILLed at step 20-29. Node 0's exit code, output,
    errors, and the seconds from the SIGKILL to the resume (or to the exit when it never resumes)."""
    loss = lose_host_1(["-m", "disttrain.worker", run_yaml], resumed=RESUMED, nproc=nproc, must_resume=False)
    return loss.code, loss.out, loss.err, loss.resumed_after


def _check_resumed_from_memory(tmp_path, layout: str, out: str, err: str, steps: int, world: str, after: float) -> int:
    """The step the survivors resumed from peer memory at; checks that at most one step was lost and
    nothing was read from disk. ``world``: the transition, e.g. '4 -> 2'."""
    m = re.search(RESUMED, out)
    assert m, out[-3000:] + err[-3000:]
    s = int(m.group(1))
    done_before = max(int(x) for x in re.findall(r"\] step (\d+)/", out[: m.start()]))
    print(f"{layout}: resumed from peer memory at step {s} ({done_before - s} step(s) lost), {after:.1f}s")
    assert done_before - s <= 1, f"{done_before - s} steps lost"
    assert "resumed from /" not in out, "a disk checkpoint was read"
    assert re.search(rf"round 1: .*lost \S+; world {world}", err), err[-3000:]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["latest", f"step_{steps:06d}"]
    return s


def _equals_resized_run(tmp_path, layout: str, overrides: list[str], steps: int, s: int, before: int, after: int):
    """The reference: ``before`` processes save at step s, ``after`` processes resume from that disk
    checkpoint (same config); parameters and every logged loss after s equal the run's."""
    ref_yaml = _config(tmp_path, "ref", steps, [*overrides, f"checkpoint.every={s}"])
    check_equals_resized_run(tmp_path, ref_yaml, _run, layout, steps, s, before, after, TOL, run_until)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_host_lost_under_tp_or_pp_resumes_from_peer_memory(tmp_path, layout):
    """dp2 x tp2 (pp2) on 2 hosts x 2 workers -> tp2 (pp2) on the survivor's two."""
    steps, mesh = 45, LAYOUTS[layout]
    run_yaml = _config(tmp_path, "run", steps, [*mesh, "checkpoint.every=0", "fault_tolerance.every=1"])
    code, out, err, after = _lose_host(tmp_path, run_yaml, 2)
    assert code == 0, out[-3000:] + err[-3000:]
    s = _check_resumed_from_memory(tmp_path, layout, out, err, steps, "4 -> 2", after)
    assert f"done: {steps} steps on 2 ranks" in out
    _equals_resized_run(tmp_path, layout, mesh, steps, s, 4, 2)


@pytest.mark.timeout(300)
def test_tp2_on_one_survivor_falls_back_to_a_layout_the_config_allows(tmp_path, monkeypatch):
    """tp2 on 2 hosts x 1 worker -> 1 rank: fault_tolerance.fallback [{tp: 2, pp: 2}, {tp: 1}] takes
    tp1 (the first does not fit one rank), resharded from the copies in memory."""
    # One worker per host gets every core, two per machine get one thread each (launcher/environment.py):
    # the same thread count on both sides keeps the float32 sums in the same order.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    steps, mesh = 45, ["parallel.mesh.tp=2", "fault_tolerance.fallback=[{tp: 2, pp: 2}, {tp: 1}]"]
    run_yaml = _config(tmp_path, "run", steps, [*mesh, "checkpoint.every=0", "fault_tolerance.every=1"])
    code, out, err, after = _lose_host(tmp_path, run_yaml, 1)
    assert code == 0, out[-3000:] + err[-3000:]
    s = _check_resumed_from_memory(tmp_path, "tp2 -> tp1", out, err, steps, "2 -> 1", after)
    assert "does not fit the world of 1 rank(s); falling back to fault_tolerance.fallback[1] (tp=1, pp=1" in err
    assert f"done: {steps} steps on 1 ranks" in out
    _equals_resized_run(tmp_path, "tp2 -> tp1", mesh, steps, s, 2, 1)


@pytest.mark.timeout(200)
def test_tp2_on_one_survivor_without_a_fallback_stops_with_what_to_set(tmp_path):
    run_yaml = _config(tmp_path, "run", 60, ["parallel.mesh.tp=2", "checkpoint.every=0", "fault_tolerance.every=1"])
    code, out, err, _ = _lose_host(tmp_path, run_yaml, 1)
    assert code != 0 and not re.search(RESUMED, out), out[-3000:] + err[-3000:]
    text = out + err
    assert "parallel.mesh (dp=auto, tp=2, pp=1) does not fit the world of 1 rank(s)" in text, text[-4000:]
    assert "HINT: set fault_tolerance.fallback" in text
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "latest"), "the stopped run wrote a checkpoint"

"""Losing a host with users' models through the user paths: a script of the user's
(tests/cases/fault_users.py) started by ``disttrain launch`` on 2 network-namespace hosts with
``--nnodes 1:2`` and only the YAML's ``fault_tolerance: {every: 1, replicas: 1}``; host 1 (agent and
worker) is SIGKILLed mid-run and the survivor's agent starts the script again at world size 1.

- a transformers GPT-2 (random init from a config) under zero3 through the user's OWN LOOP
  (``disttrain.init / run.setup / run.batches / run.backward / run.step``), with ``recover: in_place``
  asked for: the script's model object cannot be rebuilt in place, so rank 0 says so and the agent
  restarts the script (the path the recovery takes is then the same as with ``restart``);
- a peft LoRA GPT-2 (only the adapters trainable) under ddp through ``disttrain.fit``;
- the GPT-2 as import targets of a YAML run (``-m disttrain.worker``; model, data and loss targets) under
  zero2 with ``recover: in_place``, what the own loop's HINT advises: the survivor's worker PID is kept.

Each: the new worker resumes from the copies in the survivor's agent memory (0 bytes from disk, no
disk checkpoint exists before the end: ``checkpoint.every=0``), at most one step lost, and the run
ends where a run resized from a disk checkpoint at the same step ends (2 ranks save at step s, 1 rank
resumes; same global batch): every parameter within TOL (absolute) and every logged loss after s
within 1e-3 (relative) (tests/support/resized.py). The LoRA run also keeps every base weight as
built (frozen through the loss and the recovery).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from tests.cases.fault_users import lora_gpt2
from tests.support.host_loss import lose_host_1
from tests.support.resized import check_equals_resized_run
from tests.test_launcher_elastic import ROOT, _no_netns, _params

pytestmark = pytest.mark.skipif(_no_netns() is not None, reason=f"multi-host tests skipped: {_no_netns()}")
SCRIPT = os.path.join(ROOT, "tests", "cases", "fault_users.py")
RESUMED = r"resumed from peer memory at step (\d+) \((\d+) bytes\), 0 from disk \(restart 1\)"
STEPS = 24
PACE = "0.25"  # seconds after each step of the run that loses a host, so the SIGKILL lands mid-run
TOL = 1e-5  # parameters; the reference runs the same steps on the same layouts in other processes


TARGETS = (
    "model: {target: 'tests.cases.fault_users:tiny_gpt2'}\n"
    "data: {target: 'tests.cases.fault_users:tokens'}\n"
    "loss: {target: 'tests.cases.fault_users:paced_lm_step'}\n"
)


def _yaml(
    tmp_path, name: str, strategy: str, ckpt_every: int, ft_every: int, recover: str = "restart", targets: str = ""
) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        targets + f"run: {{dir: {tmp_path / name}, seed: 0}}\n"
        "launch: {backend: torch}\n"
        f"train: {{steps: {STEPS}, batch_size: 8, log_every: 1, eval_every: 0}}\n"
        "optim: {lr: 0.003}\n"
        f"parallel: {{strategy: {strategy}}}\n"
        f"checkpoint: {{every: {ckpt_every}, keep: 100}}\n"
        f"fault_tolerance: {{every: {ft_every}, replicas: 1, recover: {recover}}}\n"
    )
    return str(path)


def _launcher(mode: str):
    """A reference run of the user's script (``mode``), or of a YAML run for mode None."""

    def run(yaml: str, nproc: int) -> str:
        entry = [SCRIPT, mode, yaml] if mode else ["-m", "disttrain.worker", yaml]
        res = subprocess.run(
            [sys.executable, "-m", "launcher.cli", "--nproc-per-node", str(nproc), *entry],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=180,
            env={**os.environ, "OMP_NUM_THREADS": "1", "FAULT_USERS_STEP_SLEEP": "0"},
        )
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        return res.stdout

    return run


def _lose_host_1(
    tmp_path, mode: str | None, strategy: str, monkeypatch, recover: str = "restart"
) -> tuple[int, str, str, set[int]]:
    """The run that loses host 1 after step 8 (the user's script ``mode``, or a YAML run of the targets for
    None); returns the step it resumed at from peer memory, host 0's stdout and stderr, and the PIDs on
    host 0 before the loss."""
    monkeypatch.setenv("FAULT_USERS_STEP_SLEEP", PACE)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_yaml = _yaml(tmp_path, "run", strategy, 0, 1, recover, "" if mode else TARGETS)
    entry = [SCRIPT, mode, run_yaml] if mode else ["-m", "disttrain.worker", run_yaml]
    loss = lose_host_1(entry, resumed=RESUMED, at=r"\] step 8/")
    out, err = loss.out, loss.err
    assert loss.code == 0, loss.text
    m = re.search(RESUMED, out)
    s, nbytes = int(m.group(1)), int(m.group(2))
    done_before = max(int(x) for x in re.findall(r"\] step (\d+)/", out[: m.start()]))
    print(
        f"{mode or 'yaml'}: resumed from peer memory at step {s} ({nbytes} bytes), {done_before - s} step(s) lost, "
        f"{loss.resumed_after:.1f}s after the SIGKILL"
    )
    assert 8 <= done_before and done_before - s <= 1, f"{done_before - s} steps lost"
    assert nbytes > 0 and "resumed from /" not in out, "a disk checkpoint was read"
    assert re.search(r"round 1: .*lost \S+; world 2 -> 1", err), loss.text
    assert re.search(rf"\] step {STEPS}/{STEPS}", out[m.end() :]), out[-2000:]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["latest", f"step_{STEPS:06d}"]
    return s, out, err, loss.before


@pytest.mark.timeout(300)
def test_own_loop_gpt2_zero3_loses_a_host_and_equals_a_resized_run(tmp_path, monkeypatch):
    # recover: in_place asked for: the own loop cannot rebuild the user's model object in place, so rank 0
    # says so and the agent restarts the script, which resumes from the same copies in memory
    s, _, err, _ = _lose_host_1(tmp_path, "own_gpt2", "zero3", monkeypatch, "in_place")
    assert "recover is in_place, but a script's own loop holds your model object" in err, err[-3000:]
    monkeypatch.setenv("FAULT_USERS_STEP_SLEEP", "0")
    ref_yaml = _yaml(tmp_path, "ref", "zero3", s, 0)
    check_equals_resized_run(tmp_path, ref_yaml, _launcher("own_gpt2"), "own loop gpt2 zero3", STEPS, s, 2, 1, TOL)


@pytest.mark.timeout(300)
def test_fit_lora_ddp_loses_a_host_and_equals_a_resized_run(tmp_path, monkeypatch):
    s, *_ = _lose_host_1(tmp_path, "fit_lora", "ddp", monkeypatch)
    monkeypatch.setenv("FAULT_USERS_STEP_SLEEP", "0")
    ref_yaml = _yaml(tmp_path, "ref", "ddp", s, 0)
    check_equals_resized_run(tmp_path, ref_yaml, _launcher("fit_lora"), "fit lora ddp", STEPS, s, 2, 1, TOL)

    # only the adapters trained: every base weight of the recovered run is the one built (seed 0)
    built = {n: p.detach() for n, p in lora_gpt2().named_parameters()}
    _, got = _params(str(tmp_path / "run"))
    lora = [k for k in got if "lora_" in k]
    base = [k for k in got if "lora_" not in k]
    assert lora and base, sorted(got)
    name = {k: next(n for n in built if k.endswith(n.removeprefix("base_model.model."))) for k in got}
    assert all(torch.equal(got[k], built[name[k]]) for k in base), "a frozen base weight changed"
    assert all(not torch.equal(got[k], built[name[k]]) for k in lora if "lora_B" in k), "an adapter did not train"


@pytest.mark.timeout(300)
def test_yaml_targets_gpt2_zero2_recovers_in_place_and_equals_a_resized_run(tmp_path, monkeypatch):
    s, out, _, before = _lose_host_1(tmp_path, None, "zero2", monkeypatch, "in_place")
    moved = re.search(r"in place \(pid (\d+)\): .*lost rank 1@\S+; now rank 0 of 1, attempt 1", out)
    assert moved and int(moved.group(1)) in before, out[-3000:]  # the same worker process goes on
    monkeypatch.setenv("FAULT_USERS_STEP_SLEEP", "0")
    ref_yaml = _yaml(tmp_path, "ref", "zero2", s, 0, targets=TARGETS)
    check_equals_resized_run(tmp_path, ref_yaml, _launcher(None), "yaml gpt2 zero2 in place", STEPS, s, 2, 1, TOL)

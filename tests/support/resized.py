"""The reference the fault tests compare a recovered run with: ``before`` processes train and save at
step ``s``, ``after`` processes resume from that disk checkpoint (same config, same global batch).
Parameters at the end and every logged loss after ``s`` must equal the recovered run's.

With ``first_part=run_until`` the ``before`` part stops right after step ``s`` is saved (every rank
SIGKILLs itself at the end of step s+1 through checkpoint/testhooks.py, the save synchronous): the
steps after ``s`` are the ``after`` part's, so training them twice would only cost time."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable

from tests.test_launcher_elastic import ROOT, _losses, _params


def run_to_end(yaml: str, nproc: int) -> str:
    """``nproc`` processes of ``yaml`` (a ``disttrain run`` config) to the end; their output."""
    res = subprocess.run(
        [sys.executable, "-m", "disttrain.cli", "run", yaml, "--nproc", str(nproc)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res.stdout


def run_until(yaml: str, nproc: int, s: int) -> None:
    """``nproc`` processes of ``yaml`` (a ``disttrain run`` config that saves at step ``s``), stopped
    once step ``s`` is committed; the launcher reports the self-inflicted kill, which is expected."""
    kills = ",".join(f"kill@step_end:{r}:{s + 1}" for r in range(nproc))
    res = subprocess.run(
        [sys.executable, "-m", "disttrain.cli", "run", yaml, "--nproc", str(nproc)]
        + ["launch.max_restarts=0", "checkpoint.async_save=false"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
        env={**os.environ, "DISTTRAIN_CKPT_TEST_HOOK": kills},
    )
    assert res.returncode != 0, "the reference was not stopped at step s+1: " + res.stdout[-2000:]


def check_equals_resized_run(
    tmp_path, ref_yaml: str, run: Callable[[str, int], str], label: str, steps: int, s: int, before: int, after: int,
    tol: float, first_part: Callable[[str, int, int], None] | None = None,
) -> None:  # fmt: skip
    """``ref_yaml`` writes to ``tmp_path/ref`` with ``checkpoint.every=s``; ``run(yaml, nproc)`` returns its
    output; the recovered run is ``tmp_path/run``. ``first_part(yaml, nproc, s)`` runs the ``before``
    part (:func:`run_until` for a ``disttrain run`` config; default: ``run`` to the end)."""
    if first_part is None:
        run(ref_yaml, before)
    else:
        first_part(ref_yaml, before, s)
    ckpts = tmp_path / "ref" / "checkpoints"
    for name in os.listdir(ckpts):
        mm = re.fullmatch(r"step_(\d+)", name)
        if mm and int(mm.group(1)) > s:
            shutil.rmtree(ckpts / name)
    (tmp_path / "ref" / "metrics.jsonl").write_text("")
    assert f"resumed from {ckpts}/step_{s:06d}" in run(ref_yaml, after)

    (step_a, a), (step_b, b) = _params(str(tmp_path / "run")), _params(str(tmp_path / "ref"))
    assert step_a == step_b == steps and a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    la, lb = _losses(str(tmp_path / "run"), s), _losses(str(tmp_path / "ref"), s)
    assert sorted(la) == sorted(lb) == list(range(s + 1, steps + 1))
    worst_loss = max(abs(la[k] - lb[k]) / max(abs(lb[k]), 1e-12) for k in la)
    print(f"{label}: vs the run resized at step {s} from disk: params {worst:.3g}, loss rel {worst_loss:.3g}")
    assert worst <= tol and worst_loss <= 1e-3

"""The digits job on 2 hosts x 2 workers (network namespaces, real sshd, our authenticated store)
ends with the same parameters as one process on the same global batches.

Tolerance: 2e-5 absolute per parameter after 12 AdamW steps (only the float32 summation
order of the gradients differs between the layouts).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from disttrain import config as config_mod
from disttrain.checkpoint import CheckpointReader, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 2e-5
OVERRIDES = ["train.steps=12", "train.log_every=4", "train.eval_every=0", "checkpoint.every=0"]


def _final_params(run_dir: str) -> dict:
    path = resolve(run_dir)[0]
    reader = CheckpointReader(path)
    out = {}
    for name in sorted(n for n in reader.names if n.startswith("model.")):
        shape = reader.shape(name)
        out[name] = reader(name, shape, tuple((0, s) for s in shape))
    return out


@pytest.mark.timeout(240)
def test_digits_on_two_hosts_matches_one_process(two_hosts, tmp_path):
    a, b = two_hosts.addrs
    ref_dir, multi_dir = str(tmp_path / "one"), str(tmp_path / "multi")
    ref = subprocess.run(
        [
            sys.executable,
            "-m",
            "disttrain.cli",
            "run",
            "configs/digits.yaml",
            "--nproc",
            "1",
            f"run.dir={ref_dir}",
            *OVERRIDES,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
    )
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]

    cfg = config_mod.load(os.path.join(ROOT, "configs", "digits.yaml"), OVERRIDES + [f"run.dir={multi_dir}"])
    resolved = str(tmp_path / "multi.yaml")
    config_mod.save(cfg, resolved)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": two_hosts.ifname}
    r = two_hosts.run(
        0,
        [
            sys.executable,
            "-m",
            "launcher.cli",
            *two_hosts.launcher_flags(),
            "--hosts",
            f"{a}:2,{b}:2",
            "-x",
            f"GLOO_SOCKET_IFNAME={two_hosts.ifname}",
            "-m",
            "disttrain.worker",
            resolved,
        ],
        timeout=200,
        cwd=ROOT,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"[0@{a}]" in r.stdout and "done: 12 steps on 4 ranks" in r.stdout, r.stdout[-2000:]

    one, multi = _final_params(ref_dir), _final_params(multi_dir)
    assert one.keys() == multi.keys() and one
    worst = max(float((one[k] - multi[k]).abs().max()) for k in one)
    assert worst <= ATOL, f"2 hosts x 2 workers differ from one process by {worst:.3g} (tolerance {ATOL})"

"""The hang watch across hosts (network namespaces, real sshd, the job's authenticated store): rank 1,
on the second host, stops forever inside a step at a known line; every agent watches its own ranks,
they exchange dumps through the store, and the first host's agent prints ONE report naming rank 1,
its host and that line within hang_timeout plus a few seconds; then the job ends."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from disttrain import config as config_mod
from tests.cases import hang_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_TIMEOUT = 5.0  # under load a host may begin its first collective seconds after the other
OVERRIDES = [
    "launch.backend=torch",
    "launch.timeout=120",
    "loss.target=tests.cases.hang_step:step",
    "train.steps=50",
    "train.log_every=100",
    "train.eval_every=0",
    "checkpoint.enabled=false",
]


def _hang_line() -> int:
    with open(hang_step.__file__) as f:
        return next(i for i, line in enumerate(f, 1) if line.rstrip().endswith("# HANG"))


@pytest.mark.timeout(180)
def test_a_rank_hung_on_the_second_host_is_named_with_its_host_and_line(two_hosts, tmp_path):
    a, b = two_hosts.addrs
    cfg = config_mod.load(os.path.join(ROOT, "configs", "digits.yaml"), OVERRIDES + [f"run.dir={tmp_path / 'run'}"])
    resolved = str(tmp_path / "hang.yaml")
    config_mod.save(cfg, resolved)
    argv = [sys.executable, "-m", "launcher.cli", *two_hosts.launcher_flags(), "--hosts", f"{a}:1,{b}:1"]
    argv += ["--hang-timeout", str(HANG_TIMEOUT), "-x", f"GLOO_SOCKET_IFNAME={two_hosts.ifname}"]
    argv += ["-x", f"HANG_MARK={tmp_path / 'hang.mark'}", "-m", "disttrain.worker", resolved]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": two_hosts.ifname}
    p = two_hosts.popen(0, argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, named = [], None
    try:
        for line in p.stdout:  # the time the report's BEHIND line reaches the console
            lines.append(line.rstrip("\n"))
            if named is None and "BEHIND rank 1@" in line:
                named = time.time()
        code = p.wait(60)
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    out = "\n".join(lines)
    assert code != 0 and named is not None, out[-3000:]
    assert out.count("disttrain: hang:") == 1, out[-3000:]  # one report for the job, from one agent
    assert "rank 1 is behind" in out, out[-3000:]
    behind = next(line for line in lines if "BEHIND rank 1@" in line)
    assert f"BEHIND rank 1@{b}:" in behind and f"hang_step.py:{_hang_line()} in step" in behind, out[-3000:]
    assert re.search(r"not in a collective; last \w+#\d+", behind), behind  # its sequence number
    assert any(line.startswith(f"  rank 0@{a}: waiting in ") for line in lines), out[-3000:]
    with open(tmp_path / "hang.mark") as f:
        stopped = float(f.read())
    # within hang_timeout plus the beat period and the dumps (3 s at most): not the 120 s collective timeout
    assert named - stopped < HANG_TIMEOUT + 8, named - stopped


@pytest.mark.timeout(240)
def test_slurm_agent_mode_names_the_hung_rank_on_the_second_node(slurm_cluster, tmp_path):
    """The same through SLURM's agent mode (one ``launcher.slurm.agent`` per node under srun)."""
    cfg = config_mod.load(os.path.join(ROOT, "configs", "digits.yaml"), OVERRIDES + [f"run.dir={tmp_path / 'run'}"])
    resolved = str(tmp_path / "hang.yaml")
    config_mod.save(cfg, resolved)
    argv = ["srun", "-N2", "--ntasks-per-node=1", "--kill-on-bad-exit=0", sys.executable, "-m", "launcher.slurm.agent"]
    argv += ["--nproc-per-node", "1", "--hang-timeout", str(HANG_TIMEOUT), "--secret-dir", str(tmp_path)]
    argv += ["--stop-grace", "5", "-m", "disttrain.worker", resolved]
    env = dict(slurm_cluster.env, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = slurm_cluster.run(argv, check=False, timeout=180, cwd=ROOT, env=env)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert out.count("disttrain: hang:") == 1 and "rank 1 is behind" in out, out[-3000:]
    behind = next(line for line in out.splitlines() if "BEHIND rank 1@" in line)
    assert "BEHIND rank 1@n2:" in behind and f"hang_step.py:{_hang_line()} in step" in behind, out[-3000:]

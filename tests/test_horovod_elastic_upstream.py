"""Horovod's own elastic acceptance script for torch, with only its import changed.

``HOROVOD_SOURCE`` names a checkout of github.com/horovod/horovod (its sdist has no tests); the
file ``test/integration/data/elastic_torch_main.py`` is copied to a temporary directory with
``import horovod.torch as hvd`` replaced by ``import disttrain.horovod as hvd`` and run under
``disttrain launch --min-np/--max-np --host-discovery-script``. Without the checkout these tests
skip; nothing of Horovod's is kept in this repository. The scenarios and the expected log rows
(one JSON line per epoch, written by the script's rank 0) are those of Horovod's integration
tests: hosts added then removed, one rank failing (by exception and by SIGKILL; with a discovery
script and with fixed ``-H`` hosts), and every host failing. The discovery script here is ours: it prints the hosts of the epoch the log has reached.

The elastic synthetic benchmark (``examples/elastic/pytorch/pytorch_synthetic_benchmark_elastic.py``)
runs too when torchvision is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.environ.get("HOROVOD_SOURCE", "")
MAIN = os.path.join(SOURCE, "test", "integration", "data", "elastic_torch_main.py")
BENCH = os.path.join(SOURCE, "examples", "elastic", "pytorch", "pytorch_synthetic_benchmark_elastic.py")
IMPORT = "import horovod.torch as hvd"

pytestmark = pytest.mark.skipif(
    not os.path.isfile(MAIN), reason="set HOROVOD_SOURCE to a checkout of github.com/horovod/horovod"
)


def _ours(src: str, tmp_path) -> str:
    """Horovod's script with only the import changed."""
    with open(src) as f:
        text = f.read()
    assert text.count(IMPORT) == 1, f"{src}: expected one {IMPORT!r}"
    dst = tmp_path / os.path.basename(src)
    dst.write_text(text.replace(IMPORT, "import disttrain.horovod as hvd"))
    return str(dst)


def _discovery(tmp_path, logfile, schedule: list) -> str:
    """A script printing the hosts of epoch N (= lines in the log so far); None is every later epoch."""
    cases = [
        f"  {epoch}) " + "; ".join(f"echo {h}" for h in hosts) + " ;;" for epoch, hosts in schedule if epoch is not None
    ]
    later = next(hosts for epoch, hosts in schedule if epoch is None)
    cases.append("  *) " + "; ".join(f"echo {h}" for h in later) + " ;;")
    script = tmp_path / "discover.sh"
    script.write_text(
        f'#!/bin/sh\nn=$(cat {logfile} 2>/dev/null | wc -l | tr -d " ")\ncase "$n" in\n' + "\n".join(cases) + "\nesac\n"
    )
    script.chmod(0o700)
    return str(script)


def _run(tmp_path, schedule, *, min_np, max_np, extra=(), expect_ok=True, hosts=None) -> list[dict]:
    """``hosts``: fixed ``-H`` hosts instead of a discovery script (then no schedule goes to the script)."""
    logfile = tmp_path / "log.txt"
    argv = [sys.executable, "-m", "launcher.cli", "--min-np", str(min_np), "--max-np", str(max_np)]
    if hosts:
        argv += ["-H", hosts]
    else:
        argv += ["--host-discovery-script", _discovery(tmp_path, logfile, schedule), "--discovery-interval", "0.2"]
        extra = ["--discovery-schedule", json.dumps(schedule), *extra]
    argv += ["--elastic-timeout", "20", _ours(MAIN, tmp_path), "--logfile", str(logfile), *extra]
    env = {**os.environ, "PYTHONPATH": ROOT, "DISTTRAIN_HVD_TIMEOUT": "60"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=240)
    out = done.stdout + done.stderr
    assert (done.returncode == 0) == expect_ok, out
    return [json.loads(line) for line in logfile.read_text().splitlines()] if logfile.exists() else []


def test_hosts_added_and_removed(tmp_path):
    schedule = [(0, ["localhost:1"]), (1, ["localhost:1", "127.0.0.1:1"]), (None, ["127.0.0.1:1"])]
    rows = _run(tmp_path, schedule, min_np=1, max_np=2)
    assert [(r["start_rank"], r["size"], r["hostname"]) for r in rows] == [
        (0, 1, "localhost"),
        (0, 2, "localhost"),
        (1, 1, "127.0.0.1"),
    ], rows
    assert rows[2]["rendezvous"] == 3


@pytest.mark.parametrize("mode", ["exception", "kill"])
def test_single_rank_failure(tmp_path, mode):
    schedule = [(None, ["localhost:2", "127.0.0.1:2"])]
    extra = ["--exit-schedule", json.dumps({str((1, 0)): [0]}), "--exit-mode", mode]
    rows = _run(tmp_path, schedule, min_np=2, max_np=4, extra=extra)
    assert [(r["start_rank"], r["size"], r["rendezvous"]) for r in rows] == [(0, 4, 1), (2, 2, 2), (2, 2, 2)], rows


def test_fault_tolerance_without_scaling(tmp_path):
    extra = ["--exit-schedule", json.dumps({str((1, 0)): [0]}), "--exit-mode", "kill"]
    rows = _run(tmp_path, None, min_np=2, max_np=4, extra=extra, hosts="localhost:2,127.0.0.1:2")
    assert [(r["start_rank"], r["size"], r["rendezvous"]) for r in rows] == [(0, 4, 1), (2, 2, 2), (2, 2, 2)], rows


def test_every_host_blacklisted_fails_the_job(tmp_path):
    schedule = [(None, ["localhost:2", "127.0.0.1:2"])]
    extra = ["--exit-schedule", json.dumps({str((1, 0)): [0, 2]})]
    _run(tmp_path, schedule, min_np=2, max_np=4, extra=extra, expect_ok=False)


def test_synthetic_benchmark(tmp_path):
    pytest.importorskip("torchvision")
    if not os.path.isfile(BENCH):
        pytest.skip(f"{BENCH} is absent")
    hosts = tmp_path / "hosts.sh"
    hosts.write_text("#!/bin/sh\necho localhost:2\n")
    hosts.chmod(0o700)
    argv = [sys.executable, "-m", "launcher.cli", "--min-np", "1", "--max-np", "2", "--host-discovery-script"]
    argv += [str(hosts), _ours(BENCH, tmp_path), "--model", "resnet18", "--batch-size", "2", "--no-cuda"]
    argv += ["--num-warmup-batches", "1", "--num-batches-per-iter", "1", "--num-iters", "2"]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert done.returncode == 0 and "Total img/sec on 2 CPU(s)" in done.stdout, done.stdout + done.stderr

"""The mpi backend started by MPICH's own ``mpiexec`` (hydra), not by our launcher."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from collectives import registry
from tests.support.harness import ROOT

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(
    "mpi" not in registry.available() or MPIEXEC is None, reason="mpi4py/mpiexec not installed"
)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [1, 3])
def test_mpiexec(n):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    # MPICH's shared-memory "release_gather" collectives leave a segment in /dev/shm after
    # MPI_Finalize under hydra (3+ ranks); under our launcher the PMI server removes it.
    for op in ("BCAST", "REDUCE", "ALLREDUCE", "BARRIER"):
        env[f"MPIR_CVAR_{op}_POSIX_INTRA_ALGORITHM"] = "mpir"
    proc = subprocess.run(
        [MPIEXEC, "-n", str(n), sys.executable, "-m", "tests.cases.collective_mpiexec"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("MPIEXEC-OK") == n, out[-4000:]
    if n > 1:
        assert "['mismatch']" in out, out[-4000:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("raw", ["0", "1"])
def test_worker_leaves_cleanly_under_mpiexec(raw):
    """disttrain.worker's exit path under hydra: ranks that leave first must not get the last one killed
    (with our mpi backend, and with mpi4py used alone)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DISTTRAIN_CASE_RAW=raw)
    proc = subprocess.run(
        [MPIEXEC, "-n", "2", sys.executable, "-m", "tests.cases.mpiexec_leave"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "LATE-RANK-DONE 1" in out, out[-4000:]

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


def _mpiexec(n: int, module: str, timeout: float, **extra: str) -> str:
    """Run ``python -m module`` on ``n`` ranks under MPICH's mpiexec, without torchrun's variables;
    assert it exited 0 and return its output."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **extra)
    proc = subprocess.run(
        [MPIEXEC, "-n", str(n), sys.executable, "-m", module],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [1, 3])
def test_mpiexec(n):
    # MPICH's shared-memory "release_gather" collectives leave a segment in /dev/shm after
    # MPI_Finalize under hydra (3+ ranks); under our launcher the PMI server removes it.
    cvars = {f"MPIR_CVAR_{op}_POSIX_INTRA_ALGORITHM": "mpir" for op in ("BCAST", "REDUCE", "ALLREDUCE", "BARRIER")}
    out = _mpiexec(n, "tests.cases.collective_mpiexec", 150, **cvars)
    assert out.count("MPIEXEC-OK") == n, out[-4000:]
    if n > 1:
        assert "['mismatch']" in out, out[-4000:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("raw", ["0", "1"])
def test_worker_leaves_cleanly_under_mpiexec(raw):
    """disttrain.worker's exit path under hydra: ranks that leave first must not get the last one killed
    (with our mpi backend, and with mpi4py used alone)."""
    out = _mpiexec(2, "tests.cases.mpiexec_leave", 100, DISTTRAIN_CASE_RAW=raw)
    assert "LATE-RANK-DONE 1" in out, out[-4000:]

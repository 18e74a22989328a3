"""The CUDA paths of the collectives: nccl (CuPy) and torch (nccl process group) on CUDA tensors,
one rank per GPU. CPU-only machines (CI) skip them, saying why; ``scripts/gpu_check.sh`` runs
them (with the training paths) in one call on a GPU machine. Also here: that script's refusal
on a machine without a GPU, which CPU CI can check.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from collectives import registry
from tests.support.harness import ROOT, spawn

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_gpu = pytest.mark.skipif(GPUS == 0, reason="no CUDA GPU on this machine (scripts/gpu_check.sh runs these on one)")


@needs_gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["nccl", "torch"])
def test_cuda_conformance(backend):
    if backend == "nccl" and "nccl" not in registry.available():
        pytest.fail("a GPU is present but the nccl backend is unavailable: pip install cupy-cuda12x nvidia-nccl-cu12")
    out = spawn("tests.cases.collective_gpu:conformance", GPUS, args={"backend": backend}, timeout=240)
    assert all(o == out[0] for o in out), out
    assert len([c for c in out[0] if c.startswith("ops/")]) == 6 and "async" in out[0]
    assert ("mismatch" in out[0]) == (GPUS > 1) and ("groups" in out[0]) == (GPUS > 1)


@pytest.mark.skipif(GPUS > 0, reason="a GPU is present: the script runs its checks instead of refusing")
@pytest.mark.timeout(60)
def test_gpu_check_refuses_clearly_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=50
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "no NVIDIA GPU" in out and "HINT:" in out, out

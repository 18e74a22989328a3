"""The nccl backend on a machine without a GPU: what can be checked without one.

Checked: it imports without CuPy, reports itself unavailable, ``init`` refuses clearly,
and the unique-id exchange round-trips 128 signed bytes between real processes through a
real TCPStore. The GPU paths are unverified here (see collectives/backends/nccl.py).
"""

from __future__ import annotations

import pytest
import torch

import collectives
from collectives import registry
from collectives.backends.nccl import NCCLBackend
from tests.support.harness import spawn


@pytest.mark.unit
def test_registered_but_unavailable_without_gpu():
    assert "nccl" in registry.known()
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the conformance suite should run nccl instead")
    assert NCCLBackend.is_available() is False
    assert "nccl" not in registry.available()
    with pytest.raises(collectives.BackendUnavailableError) as info:
        collectives.init("nccl", device="cuda")
    assert "not available" in str(info.value) and "available here:" in str(info.value)


@pytest.mark.unit
def test_create_without_gpu_names_the_fix():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(collectives.BackendUnavailableError, match="HINT"):
        NCCLBackend.create(collectives.read_env({}), None, 5.0, device="cuda")


@pytest.mark.timeout(120)
def test_unique_id_exchange_through_store():
    out = spawn("tests.cases.collective_nccl:unique_id_case", 3, timeout=100)
    assert out[0] == out[1] == out[2] and len(out[0]) == 128
    assert min(out[0]) < 0 < max(out[0])  # signed chars survive the trip

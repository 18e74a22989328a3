"""``fault_tolerance.recover: in_place`` with a pipeline on the torch backend falls back to restart, saying
why: gloo's send/recv report completion only inside their blocking wait, so the abortable wait would poll
them forever (a 2-rank pp2 run with in_place made no step: its first pipeline recv never completed)."""

from __future__ import annotations

import logging
import os

import pytest

import collectives
from collectives.env import DistEnv
from disttrain import config as config_mod
from disttrain.fault.inplace import InPlace
from tests.support.harness import ROOT

pytestmark = pytest.mark.unit


class _Torch:  # declares what TorchBackend declares (abortable), without starting torch.distributed
    name, abortable, store, checks_inline, device, world_size, rank = "torch", True, None, False, None, 2, 0

    def watch_aborts(self) -> None: ...


def test_a_pipeline_on_torch_restarts_instead_and_says_why(caplog, monkeypatch):
    monkeypatch.delenv("DISTTRAIN_STORE", raising=False)
    cfg = config_mod.load(
        os.path.join(ROOT, "configs", "digits.yaml"), ["fault_tolerance.recover=in_place", "parallel.mesh.pp=2"]
    )
    env = DistEnv(0, 2, 0, 1, None, None, "single")
    with caplog.at_level(logging.WARNING, logger="disttrain.fault.inplace"):
        assert InPlace.maybe_start(cfg, collectives.Communicator(_Torch(), env)) is None
    assert "a pipeline (parallel.mesh.pp=2) on the torch backend" in caplog.text, caplog.text
    assert "restarts the workers instead" in caplog.text and "launcher" not in caplog.text, caplog.text

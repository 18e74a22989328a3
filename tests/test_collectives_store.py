"""No unauthenticated door by default: without a store, the torch, mpi and nccl backends refuse to
open a c10d TCPStore (issue 14), unless the user opts in; nothing listens on the port afterwards."""

from __future__ import annotations

import socket
import threading

import pytest

import collectives
from collectives.backends.store_fallback import OPT_IN, fallback_store
from collectives.env import DistEnv
from tests.support.harness import free_port


def _env(port: int) -> DistEnv:
    return DistEnv(0, 2, 0, 2, "127.0.0.1", port, "torchrun", "here")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.unit
@pytest.mark.parametrize("backend", ["torch", "mpi"])
def test_no_store_is_refused_and_nothing_listens(backend, monkeypatch):
    monkeypatch.delenv(OPT_IN, raising=False)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    port = free_port()
    with pytest.raises(collectives.CollectivesError) as info:
        collectives.init(backend, env=_env(port), timeout=5)
    msg = str(info.value)
    assert "unauthenticated" in msg and "HINT:" in msg and f"127.0.0.1:{port}" in msg, msg
    assert not _listening(port)


@pytest.mark.unit
def test_refusal_names_the_launchers_store(monkeypatch):
    monkeypatch.delenv(OPT_IN, raising=False)
    monkeypatch.setenv("DISTTRAIN_STORE", "127.0.0.1:1")
    with pytest.raises(collectives.CollectivesError, match="DISTTRAIN_STORE is set"):
        fallback_store(_env(free_port()), 5, "nccl")


@pytest.mark.unit
def test_opt_in_opens_the_plain_store(monkeypatch):
    monkeypatch.setenv(OPT_IN, "1")
    port = free_port()
    stores = {}

    def rank(r: int) -> None:
        stores[r] = fallback_store(DistEnv(r, 2, r, 2, "127.0.0.1", port, "torchrun", "here"), 10, "torch")

    host = threading.Thread(target=rank, args=(0,))
    host.start()
    rank(1)
    host.join(15)
    stores[0].set("k", b"v")
    assert stores[1].get("k") == b"v" and _listening(port)

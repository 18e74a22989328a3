"""Every socket a one-host job listens on, per backend, stays on loopback, also where the host
name resolves to the machine's routable address as on a cluster node (a private /etc/hosts).
The store, gloo's device, MPICH's netmod and our PMI server are all sampled from /proc while
the digits job runs through ``disttrain run``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.harness import ROOT
from tests.support.listeners import Scanner, hosts_file, in_private_hosts, off_loopback, routable_address


def _available(backend: str) -> bool:
    try:
        if backend == "mpi":
            import mpi4py  # noqa: F401
        if backend == "horovod":
            import horovod.torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", ["torch", "mpi", "horovod"])
def test_a_one_host_job_listens_on_loopback_only(tmp_path, backend):
    if os.geteuid() != 0:
        pytest.skip("a private /etc/hosts needs root (unshare -m)")
    address = routable_address()
    if address is None:
        pytest.skip("this machine has no routable address")
    if not _available(backend):
        pytest.skip(f"{backend} is not installed")
    hosts = hosts_file(str(tmp_path / "hosts"), address)
    argv = [sys.executable, "-m", "disttrain.cli", "run", "configs/digits.yaml", f"run.dir={tmp_path / 'run'}"]
    argv += [f"launch.backend={backend}", "train.steps=40", "train.eval_every=0", "checkpoint.enabled=false"]
    proc = subprocess.Popen(
        in_private_hosts(hosts, argv), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    scanner = Scanner(proc.pid)
    try:
        out, _ = proc.communicate(timeout=200)
    finally:
        seen = scanner.stop()
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "@" in out and "done:" in out  # it ran, with the host name resolving to the routable address
    assert seen, "no listener was seen: the scan did not work"
    assert off_loopback(seen) == [], f"listening beyond loopback: {off_loopback(seen)}"

"""Session fixtures and markers for the whole suite.

Layers: ``-m unit`` runs the fast, single-process tests (seconds); everything else spawns real
rank processes, namespace hosts with sshd, or a SLURM cluster. Support code lives in
``tests/support/`` (harness, rank entry point, namespaces, SLURM cluster, equivalence helpers).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from launcher.replica_store import BASE_ENV as REPLICA_BASE_ENV
from tests.support.netns import net_hosts, skip_reason
from tests.support.slurm_cluster import SlurmCluster, missing_binaries


@pytest.fixture(autouse=True)
def _remove_killed_agents_dirs(monkeypatch):
    """A SIGKILLed agent cannot remove its private directory (launcher.replica_store): the agents this
    test starts make theirs in a directory of this test's own, removed once the test is over. Only
    that one: another job's agents (a benchmark, another checkout's tests) may be running beside it."""
    parent = tempfile.mkdtemp(prefix="dt-test-replicas-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    monkeypatch.setenv(REPLICA_BASE_ENV, parent)
    yield
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="module")
def two_hosts():
    """Two network-namespace hosts with an sshd each (module-scoped: set up once per test module)."""
    reason = skip_reason()
    if reason:
        pytest.skip(f"multi-host tests skipped: {reason}")
    with net_hosts(2) as hosts:
        yield hosts


@pytest.fixture(scope="session")
def slurm_cluster():
    """munge, slurmctld and two slurmd on this host (session-scoped: started once)."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM test cluster: missing {', '.join(missing)} (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("SLURM test cluster: the daemons need root (SlurmUser=root)")
    cluster = SlurmCluster()
    try:
        cluster.start()
    except BaseException:
        cluster.close()
        raise
    try:
        yield cluster
    finally:
        cluster.close()

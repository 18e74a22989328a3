"""Command lines we build: a host name that ssh would read as an option (``-oProxyCommand=...``)
is refused before ssh runs, and ssh always gets ``--`` before the host."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from launcher.errors import LaunchConfigError
from launcher.hostfile import HostSlots, check_host, parse_hosts, plan_nodes
from launcher.ssh import SshOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "cases", "security_worker.py")


@pytest.mark.unit
def test_host_names_that_look_like_options_are_refused_and_ssh_gets_a_double_dash():
    for good in ("node1", "10.77.0.2", "[fe80::1%eth0]", "alice@node-3.cluster", "n_1"):
        assert check_host(good, "t") == good
    for bad in ("-oProxyCommand=sh", "-p22", "node 1", "a;b", "$(id)", "", "x" * 300):
        with pytest.raises(LaunchConfigError, match="not a host name"):
            check_host(bad, "t")
    with pytest.raises(LaunchConfigError, match="not a host name"):
        parse_hosts("node1:1,-oProxyCommand=sh:1")
    with pytest.raises(LaunchConfigError, match="not a host name"):
        plan_nodes([HostSlots("-F/tmp/cfg", 1)])  # the Python API skips the parsers
    argv = SshOptions(port=2222, user="alice").command("node1", "echo hi")
    assert argv[-3:] == ["--", "node1", "echo hi"]
    with pytest.raises(LaunchConfigError, match="ssh option"):
        SshOptions().command("-oProxyCommand=sh", "true")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("via", ["hostfile", "hosts"])
def test_a_proxycommand_host_never_reaches_ssh(tmp_path, via):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.sh"
    evil.write_text(f"#!/bin/sh\ntouch {marker}\n")
    evil.chmod(0o755)
    host = f"-oProxyCommand={evil}"
    if via == "hostfile":
        hostfile = tmp_path / "hosts"
        hostfile.write_text(f"localhost slots=1\n{host} slots=1\n")
        flags = ["--hostfile", str(hostfile)]
    else:
        flags = ["--hosts", f"localhost:1,{host}:1"]
    r = subprocess.run(
        [sys.executable, "-m", "launcher.cli", *flags, "--ssh-connect-timeout", "3", WORKER, "sleep"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=45,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "is not a host name" in r.stderr and "it was not passed to ssh" in r.stderr
    assert not marker.exists()

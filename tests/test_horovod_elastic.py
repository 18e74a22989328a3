"""Horovod's elastic API under ``disttrain launch --min-np/--max-np --host-discovery-script``.

Hosts are loopback names of this machine (127.0.0.1, 127.0.0.2, ...: the driver starts workers
on this machine only). The discovery script prints a file the test rewrites while training runs,
when the steps log (tests/cases/hvd_elastic.py) shows the job got far enough.

- A host removed, then one added: the world goes 3 -> 2 -> 3, the joiner starts from the
  survivors' committed step (never from step 0), no committed step is lost or done twice, and
  the final parameters equal one process's run of the same batches (tolerance 1e-6: the averaged
  gradient of identical gradients may differ in the last bit). The ElasticSampler's epoch 0,
  dealt over worlds of 3, 2 and 3, sees every sample exactly once.
- A worker SIGKILLed mid-step: its host is blacklisted (``--blacklist-cooldown-range 0.5 0.5``),
  the survivor rolls back to the last commit, redoes only the step in flight, the host returns
  after its cooldown (2 -> 1 -> 2), and the job ends with the same parameters.
- Both: every world runs over shm (one machine), and no segment outlives its world.
- Unit: the discovery script's output, its diff, and State's save/restore without collectives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from launcher.discovery import DiscoveryError, HostDiscovery, diff, parse_hosts_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "cases", "hvd_elastic.py")
sys.path.insert(0, os.path.join(ROOT, "tests", "cases"))
import hvd_elastic  # noqa: E402

TOL = 1e-6


class ElasticJob:
    def __init__(
        self,
        tmp_path,
        hosts: str,
        batches: int,
        *extra: str,
        min_np: int = 1,
        max_np: int = 3,
        launcher_args: list[str] | None = None,
    ):
        self.tmp = tmp_path
        self.hosts_file = tmp_path / "hosts.txt"
        self.set_hosts(hosts)
        script = tmp_path / "hosts.sh"
        script.write_text(f"#!/bin/sh\ncat {self.hosts_file}\n")
        script.chmod(0o700)
        self.log, self.out = tmp_path / "steps.jsonl", tmp_path / "params.json"
        argv = [sys.executable, "-m", "launcher.cli", "--min-np", str(min_np), "--max-np", str(max_np)]
        argv += ["--host-discovery-script", str(script), "--elastic-timeout", "30", *(launcher_args or []), SCRIPT]
        argv += ["--batches", str(batches), "--steps-log", str(self.log), "--params-out", str(self.out), *extra]
        env = {**os.environ, "PYTHONPATH": ROOT, "DISTTRAIN_HVD_TIMEOUT": "60"}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def set_hosts(self, text: str) -> None:
        tmp = self.hosts_file.with_suffix(".new")
        tmp.write_text(text)
        os.replace(tmp, self.hosts_file)  # the script never reads half a file

    def steps(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def wait_for_batch(self, batch: int, size: int | None = None, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(s["batch"] >= batch and (size is None or s["size"] == size) for s in self.steps()):
                return
            if self.proc.poll() is not None:
                pytest.fail(f"the job ended early:\n{self.proc.stdout.read()}")
            time.sleep(0.1)
        self.proc.kill()
        pytest.fail(f"no step {batch} at size {size} within {timeout:g}s:\n{self.proc.communicate()[0]}")

    def finish(self, timeout: float = 180.0) -> str:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the job did not end within {timeout:g}s:\n{self.proc.communicate()[0]}")
        assert self.proc.returncode == 0, out
        return out


def _check_params(job: ElasticJob, batches: int) -> None:
    got = json.loads(job.out.read_text())
    want = hvd_elastic.expected_params(batches)
    for name, value in want.items():
        torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(value), rtol=TOL, atol=TOL)


def _segments_of(pids: set[int]) -> list[str]:
    """shm segments (and their alloc'd buffers) in /dev/shm created by one of ``pids``: none may
    outlive the worlds that made them (header: magic, world, bytes, creator pid)."""
    found = []
    for name in os.listdir("/dev/shm"):
        if name.startswith("disttrain-"):
            try:
                with open(os.path.join("/dev/shm", name), "rb") as f:
                    head = f.read(32)
            except OSError:
                continue
            if len(head) == 32 and int.from_bytes(head[24:32], "little") in pids:
                found.append(name)
    return found


def _sizes(steps: list[dict]) -> list[int]:
    """World sizes in the order rank 0 saw them (consecutive duplicates dropped)."""
    out: list[int] = []
    for s in steps:
        if s["rank"] == 0 and (not out or out[-1] != s["size"]):
            out.append(s["size"])
    return out


def test_a_host_removed_then_one_added_keeps_every_committed_step(tmp_path):
    batches, samples = 40, 60
    job = ElasticJob(
        tmp_path, "127.0.0.1:2\n127.0.0.2:1\n", batches, "--samples", str(samples), "--commit-samples", "6"
    )
    job.wait_for_batch(6, size=3)
    job.set_hosts("127.0.0.1:2\n")
    job.wait_for_batch(14, size=2)
    job.set_hosts("127.0.0.1:2\n127.0.0.3:1\n")
    out = job.finish()
    steps = job.steps()
    assert _sizes(steps) == [3, 2, 3], out
    assert "removed 127.0.0.2" in out and "added 127.0.0.3" in out, out
    for pid in {s["pid"] for s in steps}:
        mine = [s["batch"] for s in steps if s["pid"] == pid]
        assert mine == list(range(mine[0], mine[0] + len(mine))), f"pid {pid} skipped or repeated a step: {mine}"
    joiner = [s for s in steps if s["host"] == "127.0.0.3"]
    assert joiner and joiner[0]["batch"] > 14, "the joiner did not start from the committed state"
    assert {s["rendezvous"] for s in joiner} == {joiner[0]["rendezvous"]} and joiner[0]["rendezvous"] >= 3
    assert not [s for s in steps if s["host"] == "127.0.0.2" and s["size"] == 2]
    # ElasticSampler: epoch 0 dealt over worlds of 3, 2 and 3 saw every sample once; epoch 1 none twice
    seen = {e: sorted(s["sample"] for s in steps if s["epoch"] == e) for e in (0, 1)}
    assert seen[0] == list(range(samples)), seen[0]
    assert seen[1] and len(seen[1]) == len(set(seen[1])), seen[1]
    assert {s["backend"] for s in steps} == {"shm"}  # one machine: every world over shared memory
    assert not _segments_of({s["pid"] for s in steps})
    _check_params(job, batches)


def test_a_worker_killed_mid_step_rolls_back_to_the_last_commit_and_its_host_returns(tmp_path):
    batches, kill_at = 50, 5
    marker = tmp_path / "killed"
    job = ElasticJob(
        tmp_path,
        "127.0.0.1:1\n127.0.0.2:1\n",
        batches,
        "--kill-host",
        "127.0.0.2",
        "--kill-at",
        str(kill_at),
        "--kill-marker",
        str(marker),
        launcher_args=["--blacklist-cooldown-range", "0.5", "0.5"],
    )
    out = job.finish()
    assert marker.exists()
    assert "on 127.0.0.2 failed (killed by signal SIGKILL); host blacklisted for 0.5s" in out, out
    assert "host 127.0.0.2's blacklist cooldown ended" in out, out
    steps = job.steps()
    assert _sizes(steps) == [2, 1, 2], out  # the host returned after its cooldown
    survivor = [s["batch"] for s in steps if s["host"] == "127.0.0.1"]
    # Only the step in flight may be done twice: it may have finished here before the commit's
    # collective found the peer gone; the rollback then goes back to step kill_at's commit.
    repeated = [b for i, b in enumerate(survivor) if b in survivor[:i]]
    assert sorted(set(survivor)) == list(range(1, batches + 1)) and repeated in ([], [kill_at + 1]), survivor
    assert max(s["rendezvous"] for s in steps) == 3
    assert {s["backend"] for s in steps} == {"shm"} and not _segments_of({s["pid"] for s in steps})
    _check_params(job, batches)


# -- unit ---------------------------------------------------------------------------------------
@pytest.mark.unit
def test_discovery_output_and_diff(tmp_path):
    assert parse_hosts_output("a:2\n\nb\n", "s.sh", slots_per_host=3) == {"a": 2, "b": 3}
    for bad, why in [("a:x", "host or host:slots"), ("a:0", "at least 1"), ("a\na", "twice"), ("-oProxy=x", "not a")]:
        with pytest.raises(Exception, match=why):
            parse_hosts_output(bad, "s.sh")
    change = diff({"a": 2, "b": 1}, {"a": 1, "c": 1})
    assert change.added == ("a", "c") and change.removed == ("a", "b")
    assert not diff({"a": 1}, {"a": 1})
    failing = tmp_path / "fail.sh"
    failing.write_text("#!/bin/sh\necho boom >&2\nexit 3\n")
    failing.chmod(0o700)
    with pytest.raises(DiscoveryError, match="exited with code 3: boom"):
        HostDiscovery(str(failing)).find()


@pytest.mark.unit
def test_torch_state_restores_the_last_commit_without_collectives():
    from disttrain.horovod.elastic import TorchState

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = TorchState(model, opt, epoch=0, seen=[1])
    state.save()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.ones(3, 2)).sum().backward()
    opt.step()
    state.epoch, state.seen = 5, [1, 2]
    state.seen.append(3)
    state.restore()
    assert state.epoch == 0 and state.seen == [1]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert opt.state_dict()["state"] == {}
    assert state.model is model and state.optimizer is opt

"""Attacks on the run directory by a second local user: a run directory they created, a parent
they can write, symlinks planted where we write temporaries, a ``config.yaml`` swapped after the
launch (with a target module planted next to it), and reading what the job wrote."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys

import pytest
import torch
import yaml

from disttrain import rundir
from disttrain.checkpoint.writer import RankWrite, commit
from disttrain.parallel.strategy import Shard
from tests.support.harness import ROOT
from tests.support.users import intruder, run_as, sticky_base

VICTIM = b"the owner's own data\n"


@pytest.fixture
def base():
    with sticky_base("dt-rundir-") as d:
        yield d


def _victims(base: str) -> dict[str, str]:
    """Files of the job's owner that a planted symlink would make the job overwrite."""
    os.makedirs(os.path.join(base, "owner"), mode=0o700)
    out = {}
    for name in ("a", "b", "c", "d"):
        p = os.path.join(base, "owner", name)
        with open(p, "wb") as f:
            f.write(VICTIM)
        out[name] = p
    return out


def _disttrain_run(run_dir: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "disttrain.cli", "run", "configs/digits.yaml", f"run.dir={run_dir}", *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )


def test_a_run_directory_prepared_by_another_user_is_refused_and_nothing_is_written(base):
    other = intruder()
    victims = _victims(base)
    run = os.path.join(base, "run")
    plant = f"mkdir -m 777 {run} && cd {run} && " + " && ".join(
        f"ln -s {victims[v]} {name}"
        for v, name in (
            ("a", "config.yaml.tmp"),
            ("b", "summary.json.tmp"),
            ("c", "metrics.jsonl"),
            ("d", "config.yaml"),
        )
    )
    assert run_as(other, ["sh", "-c", plant], timeout=30).returncode == 0
    proc = _disttrain_run(run, "train.steps=5")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"is owned by {other.pw_name}" in proc.stderr and "nothing was written" in proc.stderr, proc.stderr
    assert all(open(p, "rb").read() == VICTIM for p in victims.values())
    assert sorted(os.listdir(run)) == ["config.yaml", "config.yaml.tmp", "metrics.jsonl", "summary.json.tmp"]
    # Our own directory under a parent the other user can write (not sticky): refused too, naming the parent.
    shared = os.path.join(base, "project")
    os.mkdir(shared)
    os.chmod(shared, 0o777)
    proc = _disttrain_run(os.path.join(shared, "run"), "train.steps=5")
    assert proc.returncode == 2 and f"its parent {shared} is writable by everyone" in proc.stderr, proc.stderr


@pytest.mark.timeout(240)
def test_a_shared_group_run_never_writes_through_planted_symlinks(base):
    """With run.shared_group the group may write the directory: the job still creates every file
    fresh (O_EXCL, O_NOFOLLOW, unpredictable temporaries), so links planted under the old
    predictable names go untouched, and the job finishes."""
    other = intruder()
    victims = _victims(base)
    run = os.path.join(base, "run")
    os.mkdir(run)
    os.chown(run, 0, other.pw_gid)
    os.chmod(run, 0o2770)
    names = {"a": "config.yaml.tmp", "b": "summary.json.tmp", "c": "loss.png.tmp"}
    os.chmod(os.path.join(base, "owner"), 0o755)  # the other user links to the files (cannot write them)
    plant = f"cd {run} && " + " && ".join(f"ln -s {victims[v]} {n}" for v, n in names.items())
    assert run_as(other, ["sh", "-c", plant], timeout=30).returncode == 0, "plant failed"
    proc = _disttrain_run(run, "train.steps=20", "train.eval_every=0", "run.shared_group=true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(open(p, "rb").read() == VICTIM for p in victims.values())
    for n in ("config.yaml", "summary.json", "loss.png"):
        st = os.lstat(os.path.join(run, n))
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640, (n, oct(st.st_mode))
    shard = os.path.join(run, "checkpoints", "step_000020", "rank_00000.safetensors")
    assert stat.S_IMODE(os.stat(shard).st_mode) == 0o640
    # A metrics.jsonl link planted in a shared directory is refused, never appended through.
    os.unlink(os.path.join(run, "metrics.jsonl"))
    os.symlink(victims["d"], os.path.join(run, "metrics.jsonl"))
    with pytest.raises(rundir.RunDirError, match="symlink is not followed"):
        rundir.RunDir(run, 0, shared_group=True)
    assert open(victims["d"], "rb").read() == VICTIM


@pytest.mark.unit
def test_what_the_job_writes_is_private_to_its_owner(base):
    other = intruder()
    run = rundir.prepare(os.path.join(base, "run"))
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o700
    rd = rundir.RunDir(run, 0)
    rd.write_json("summary.json", {"ok": 1})
    rd.log_metrics({"step": 1})
    ckpt = os.path.join(run, "checkpoints")
    os.mkdir(ckpt)
    job = RankWrite(ckpt, 1, 0, [Shard("w", torch.ones(4), (4,), ((0, 4),))])
    job.write_live()
    step = commit(ckpt, 1, 1, {}, [job.record({})], {"step": 1}, keep=1)
    rd.close()
    files = [os.path.join(run, "summary.json"), os.path.join(run, "metrics.jsonl"), os.path.join(ckpt, "latest")]
    files += [os.path.join(step, n) for n in os.listdir(step)]
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, (f, oct(os.stat(f).st_mode))
    os.chmod(run, 0o711)  # even with the directory traversable, the files stay unreadable to others
    try:
        for f in files:
            got = run_as(other, ["cat", f], timeout=30)
            assert got.returncode != 0 and "Permission denied" in got.stderr, (f, got.stdout)
    finally:
        os.chmod(run, 0o700)


def _worker(config: str, sha256: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTTRAIN_")}
    if sha256:
        env["DISTTRAIN_CONFIG_SHA256"] = sha256
    env["PYTHONPATH"] = ROOT
    return subprocess.run(
        [sys.executable, "-m", "disttrain.worker", config],
        capture_output=True,
        text=True,
        cwd="/",
        env=env,
        timeout=120,
    )


def test_a_swapped_config_is_refused_before_any_target_is_imported(base):
    """The workers re-read RUN_DIR/config.yaml: one swapped after the launch is refused by its
    SHA-256 before a target is imported, and the run directory is not on the import path."""
    run = rundir.prepare(os.path.join(base, "run"))
    marker = os.path.join(base, "pwned")
    with open(os.path.join(run, "evil.py"), "w") as f:  # a module planted next to the config
        f.write(f"open({marker!r}, 'w').write('ran')\ndef build(**kw):\n    return None\n")
    from disttrain import config as config_mod

    cfg = config_mod.load(os.path.join(ROOT, "configs", "digits.yaml"), [f"run.dir={run}"])
    resolved = os.path.join(run, "config.yaml")
    digest = config_mod.save(cfg, resolved)
    assert hashlib.sha256(open(resolved, "rb").read()).hexdigest() == digest
    data = yaml.safe_load(open(resolved))
    data["model"] = {"target": "evil:build"}
    swapped = yaml.safe_dump(data)
    rundir.write_atomic(resolved, swapped.encode())
    proc = _worker(resolved, digest)
    assert proc.returncode == 2 and "SHA-256" in proc.stderr and "was not used" in proc.stderr, proc.stderr
    assert not os.path.exists(marker)
    # Even with a matching digest the run directory is not where targets are looked for.
    proc = _worker(resolved, hashlib.sha256(swapped.encode()).hexdigest())
    assert proc.returncode == 2 and "cannot import 'evil:build'" in proc.stderr, proc.stderr
    assert not os.path.exists(marker)

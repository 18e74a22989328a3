"""The job secret file is a door: it is trusted only when it is a regular file of ours, 0600.

Each test plants what a stranger on a shared filesystem could plant (a file owned by someone
else, a readable file, a link, a FIFO, a huge file) and checks that the job refuses it, says
why, logs it, and leaves the planted thing alone.
"""

import logging
import os
import stat

import pytest

from launcher.slurm.errors import SlurmEnvError
from launcher.slurm.place import read_slurm_env
from launcher.slurm.secret import (
    SECRET_FILE,
    ensure_secret_file,
    job_secret,
    main,
    read_secret_file,
    write_secret_file,
)

pytestmark = pytest.mark.unit
NOBODY = 65534
GOOD = "7d1c9a0e5b3f48c2a6e1d09b7f3c5a8e2b4d6f1a9c0e7b3d5f2a8c6e1b4d9f07"

LOOSE_MODES = [
    pytest.param(0o640, id="group-readable"),
    pytest.param(0o604, id="world-readable"),
    pytest.param(0o620, id="group-writable"),
    pytest.param(0o666, id="everyone-reads-and-writes"),
]


def _plant(path, text=GOOD, mode=0o600):
    path.write_text(text)
    os.chmod(path, mode)
    return path


def _place(**kw):
    env = {
        "SLURM_JOB_ID": "77",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_NNODES": "1",
        "SLURM_STEP_NODELIST": "n1",
    }
    env.update(kw)
    return read_slurm_env(env)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def test_secret_file_of_ours_with_mode_0600_is_read(tmp_path):
    assert read_secret_file(str(_plant(tmp_path / "s", GOOD + "\n"))) == GOOD


@pytest.mark.parametrize("mode", LOOSE_MODES)
def test_secret_file_others_may_read_or_write_is_refused(tmp_path, mode):
    path = _plant(tmp_path / "s", mode=mode)
    with pytest.raises(SlurmEnvError, match=rf"{path}: has mode 0{mode:o}.*HINT: chmod 600"):
        read_secret_file(str(path))


@needs_root
def test_secret_file_owned_by_another_user_is_refused(tmp_path):
    path = _plant(tmp_path / "s")
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(SlurmEnvError, match=rf"owned by uid {NOBODY}, not by this job's user"):
        read_secret_file(str(path))


def test_symbolic_link_to_a_secret_is_refused_not_followed(tmp_path):
    target = _plant(tmp_path / "real")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(SlurmEnvError, match="is a symbolic link"):
        read_secret_file(str(tmp_path / "link"))


def test_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path, 0o600)
    with pytest.raises(SlurmEnvError, match="not a regular file"):
        read_secret_file(str(path))


def test_huge_file_is_refused(tmp_path):
    path = _plant(tmp_path / "s", "a" * 10_000)
    with pytest.raises(SlurmEnvError, match="larger than"):
        read_secret_file(str(path))


def test_empty_or_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(SlurmEnvError, match=rf"{tmp_path / 'e'}: the file is empty"):
        read_secret_file(str(_plant(tmp_path / "e", "")))
    with pytest.raises(SlurmEnvError, match="cannot read it"):
        read_secret_file(str(tmp_path / "missing"))


def test_refusal_is_logged(tmp_path, caplog):
    path = _plant(tmp_path / "s", mode=0o644)
    with caplog.at_level(logging.WARNING, logger="launcher.slurm.secret"), pytest.raises(SlurmEnvError):
        read_secret_file(str(path))
    assert f"job secret {path} refused" in caplog.text


def test_written_secret_file_is_0600_and_never_replaces_an_existing_file(tmp_path):
    path = tmp_path / "s"
    write_secret_file(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(read_secret_file(str(path))) == 64
    first = path.read_text()
    with pytest.raises(FileExistsError):
        write_secret_file(str(path))
    assert path.read_text() == first and os.listdir(tmp_path) == ["s"]  # no temporary left behind


def test_batch_script_step_creates_keeps_and_replaces_only_an_empty_file_of_ours(tmp_path):
    path = tmp_path / "s"
    ensure_secret_file(str(path))
    first = path.read_text()
    ensure_secret_file(str(path))  # a requeued attempt of the same job: same secret
    assert path.read_text() == first
    _plant(path, "")  # a crash between creating and writing it
    ensure_secret_file(str(path))
    assert len(read_secret_file(str(path))) == 64


@needs_root
def test_batch_script_step_refuses_a_planted_file_and_leaves_it_alone(tmp_path, capsys):
    path = _plant(tmp_path / "s", "chosen-by-the-attacker", 0o644)
    os.chown(path, NOBODY, NOBODY)
    assert main([str(path)]) == 2
    assert "owned by uid" in capsys.readouterr().err
    assert path.read_text() == "chosen-by-the-attacker" and path.stat().st_uid == NOBODY


def test_batch_script_step_does_not_write_through_a_planted_link(tmp_path, capsys):
    victim = tmp_path / "victim"
    (tmp_path / "s").symlink_to(victim)
    assert main([str(tmp_path / "s")]) == 2
    assert "symbolic link" in capsys.readouterr().err and not victim.exists()


def test_secret_file_named_by_the_environment_is_checked(tmp_path):
    path = _plant(tmp_path / "s", mode=0o644)
    with pytest.raises(SlurmEnvError, match="has mode 0644"):
        job_secret(_place(), None, creator=False, env={SECRET_FILE: str(path)})
    assert job_secret(_place(), None, creator=False, env={"DISTTRAIN_JOB_SECRET": GOOD}) == (GOOD, None)


def test_rank0_fallback_file_is_read_by_the_others(tmp_path):
    secret, path = job_secret(_place(), str(tmp_path), creator=True, env={})
    assert path is not None and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert job_secret(_place(SLURM_PROCID="1"), str(tmp_path), creator=False, env={}) == (secret, None)


def test_file_planted_at_rank0s_fallback_name_is_refused(tmp_path):
    planted = _plant(tmp_path / ".slurm-secret-77.0.0", "chosen-by-the-attacker")
    with pytest.raises(SlurmEnvError, match="exists before rank 0 created it"):
        job_secret(_place(), str(tmp_path), creator=True, env={})
    assert planted.read_text() == "chosen-by-the-attacker"


def test_no_secret_anywhere_is_an_error_with_a_hint():
    with pytest.raises(SlurmEnvError, match=r"no job secret. HINT: export DISTTRAIN_JOB_SECRET"):
        job_secret(_place(), None, creator=True, env={})

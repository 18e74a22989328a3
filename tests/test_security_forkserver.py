"""Attacks on the DataLoader's forkserver (``data.worker_start: forkserver``, ``disttrain/data/workers.py``).

The forkserver of a rank takes, on a Unix socket, the descriptors of a new worker and then runs the
pickle it reads from one of them: whoever can connect can have code run as the rank's user. Python
>= 3.10.9 / 3.11.1 binds it at ``$TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX``: the directory 0700, the
socket 0600 (a worker's resource_sharer listener beside it: umask, 0755, with an authkey), all the
rank's; the forkserver has no authkey (CVE-2022-42919: older ones bound it in the abstract
namespace, open to every local user; ``loader_options`` then starts workers by spawn instead).

A real rank process starts a forkserver DataLoader with two workers; while they run, every
listening Unix socket of its process tree (the rank, the forkserver, the workers: a worker's
``resource_sharer`` when one is up) is read from /proc/net/unix. Each is a path (none abstract)
in a 0700 directory of ours; another local user (``tests/support/users``) cannot connect to any,
nor signal the rank or its forkserver. The loader then yields every sample once (the job was not
disturbed) and the rank exits 0.

A rank SIGKILLed while its forkserver workers wait leaves none of them, nor the server, behind: the
workers are the server's children, so neither torch's watchdog nor the launcher's PDEATHSIG reaches
them; each watches the rank's pidfd instead (``disttrain/data/workers.py``).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.support.listeners import _descendants, unix_listening
from tests.support.users import intruder, run_as

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 64
RANK = f"""
import sys
import torch
from torch.utils.data import DataLoader, TensorDataset
from disttrain.data.workers import loader_options, started

if __name__ == "__main__":
    ds = TensorDataset(torch.arange({N}, dtype=torch.float64))
    it = started(DataLoader(ds, batch_size=4, **loader_options(2, "forkserver", ds)), 0, "train")
    total = float(next(it)[0].sum())
    print("ready", flush=True)
    sys.stdin.readline()
    total += sum(float(b.sum()) for (b,) in it)
    print("total", total, flush=True)
"""
CONNECT = """
import socket, sys
for path in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path.replace("@", "\\0", 1) if path.startswith("@") else path)
        s.sendall(b"x" * 64)
        print("CONNECTED", path)
    except OSError as exc:
        print("refused", path, exc.strerror)
    finally:
        s.close()
"""


def _start_rank(tmp_path) -> subprocess.Popen:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=ROOT, env=env, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout.readline() == "ready\n", proc.stderr.read() if proc.poll() is not None else ""
    return proc


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for a reaper this container may lack)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


@pytest.mark.timeout(120)
def test_a_killed_rank_leaves_no_forkserver_or_worker_behind(tmp_path):
    proc = _start_rank(tmp_path)
    try:
        left = _descendants(proc.pid) - {proc.pid}  # the forkserver, its two workers, the resource tracker
        assert len(left) >= 3, left
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while any(map(_running, left)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in left if _running(p)], "left running after the rank was SIGKILLed"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass


@pytest.mark.timeout(180)
def test_another_user_cannot_reach_the_forkserver_or_its_workers(tmp_path):
    user = intruder()
    proc = _start_rank(tmp_path)
    try:
        seen: dict[str, int] = {}
        for _ in range(20):  # workers' resource_sharer listeners come and go: sample a while
            seen |= unix_listening(proc.pid)
            time.sleep(0.05)
        assert seen, "no listening socket found: the forkserver is not where we looked"
        assert any(os.path.basename(p).startswith("listener-") for p in seen), seen
        for path in seen:
            assert not path.startswith("@"), f"{path}: an abstract socket, any local user may connect"
            d = os.lstat(os.path.dirname(path))
            assert stat.S_ISDIR(d.st_mode) and d.st_uid == os.getuid() and stat.S_IMODE(d.st_mode) == 0o700, path
            s = os.lstat(path)
            assert stat.S_ISSOCK(s.st_mode) and s.st_uid == os.getuid() and not s.st_mode & 0o022, path
        res = run_as(user, ["/usr/bin/python3", "-c", CONNECT, *seen], timeout=60)
        assert res.returncode == 0 and "CONNECTED" not in res.stdout, res.stdout + res.stderr
        assert res.stdout.count("refused") == len(seen) and "Permission denied" in res.stdout, res.stdout
        for pid in {proc.pid, *seen.values()}:
            res = run_as(user, ["kill", "-TERM", str(pid)], timeout=30)
            assert res.returncode != 0 and "not permitted" in res.stderr, res.stderr
        out, err = proc.communicate("\n", timeout=120)
    finally:
        if proc.poll() is None:  # the whole group: workers forked by the forkserver outlive a killed rank
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert out.strip() == f"total {float(sum(range(N)))}", out + err[-3000:]

"""DataLoader workers of a threaded rank (disttrain/data/workers.py): no lock another thread holds at
the workers' start reaches them; a dataset that does not pickle is named with what to change; the
hang watch shows where a stuck worker stands, in Python."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
from torch.utils.data import DataLoader

from disttrain.data import GlobalBatchSampler, StepLoader
from disttrain.data.loader import eval_split
from disttrain.errors import DisttrainError
from launcher.hang import HangWatch, format_report
from tests.cases import data_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.timeout(120)


def test_a_lock_held_by_another_thread_reaches_no_worker():
    release = data_workers.hold_forever()
    try:
        # The cause, shown with torch's fork: the child starts with HELD taken and waits forever.
        forked = DataLoader(
            data_workers.Squares(), batch_size=4, num_workers=1, multiprocessing_context="fork", timeout=2
        )
        with pytest.raises(RuntimeError, match="timed out"):
            next(iter(forked))
        # Ours: train and eval loaders' workers come from the forkserver, where HELD is free.
        loader = StepLoader(data_workers.Squares(), GlobalBatchSampler(16, 4, seed=0), 2, 0, num_workers=1)
        got = [mb for mb in loader.micro_batches(0)] + [mb for mb in loader.micro_batches(1)]
        assert len(got) == 4 and all(mb is not None and mb.shape == (2, 1) for mb in got)
        loader.close()
        batches, n = eval_split(data_workers.Squares(), 8, rank=0, world=2, batch=2, num_workers=1)
        assert n == 4 and [b.flatten().tolist() for b in batches] == [[0, 4], [16, 36]]
    finally:
        release.set()


def test_a_collate_that_does_not_pickle_is_named_with_rank_and_what_to_set():
    loader = StepLoader(data_workers.Squares(), GlobalBatchSampler(16, 4, seed=0), 1, 0, lambda b: b, num_workers=1)
    with pytest.raises(DisttrainError, match=r"rank 0@.*training DataLoader's workers \(forkserver\)") as e:
        next(iter(loader.micro_batches(0)))
    assert "HINT" in str(e.value) and "data.worker_start: fork" in str(e.value)
    fork = StepLoader(data_workers.Squares(), GlobalBatchSampler(16, 4, seed=0), 1, 0, lambda b: b, 1, "fork")
    assert len(next(iter(fork.micro_batches(0)))) == 4  # fork needs no pickling
    fork.close()


def test_the_hang_dump_shows_a_stuck_workers_python_stack(tmp_path):
    trace = str(tmp_path / "trace")
    watch = HangWatch(trace, [0], timeout=0, host="here", dump_wait=2.0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.cases.data_workers", trace],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "reading"
        deadline = time.monotonic() + 60
        while not glob.glob(os.path.join(trace, "rank0.child*.stacks.txt")) and time.monotonic() < deadline:
            time.sleep(0.1)  # the worker registers its stack file as it starts
        watch.pids = {0: proc.pid}
        (dump,) = watch.collect()
        (child,) = dump["child_stacks"]
        frames = [f for t in child["stacks"] for f in t["frames"]]
        assert any(f["function"] == "__getitem__" and f["file"].endswith("data_workers.py") for f in frames), child
        assert not dump.get("missing") and dump["pid"] == proc.pid  # the rank answered with its own dump
        assert f"child pid {child['pid']} (its Python): now at" in format_report([dump], "test")
        assert proc.poll() is None  # the forkserver and the rank were not signalled to death
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

"""disttrain.horovod: Horovod's documented usage patterns, at 2 and 3 ranks, on real processes.

One job per (world size, backend) runs every pattern (tests/cases/hvd_api.py) and each test
checks its pattern's result on every rank, so a broken pattern fails its own test. Parallel
results are compared with one process on the same global batch (computed inside the job).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.cases.hvd_api import PATTERNS
from tests.support.harness import ROOT, spawn

pytestmark = pytest.mark.timeout(300)
TOL = 1e-5
JOBS = {
    (2, "shm"): list(PATTERNS),
    (3, "shm"): list(PATTERNS),
    (2, "torch"): ["training", "join", "mismatch", "process_sets", "alltoall", "allgather"],
}
_cache: dict = {}


def _job(world: int, backend: str, tmp_path_factory) -> list[dict]:
    key = (world, backend)
    if key not in _cache:  # a failed job fails every test of it, without rerunning it
        path = str(tmp_path_factory.mktemp("hvd") / "timeline.json")
        try:
            _cache[key] = spawn(
                "tests.cases.hvd_api:patterns",
                world,
                timeout=240,
                args={"names": JOBS[key], "args": {"timeline": {"path": path}}},
                env={"DISTTRAIN_HVD_BACKEND": backend, "DISTTRAIN_HVD_TIMEOUT": "60"},
            )
        except Exception as exc:  # RankFailure: keep it for the other tests of this job
            _cache[key] = exc
    if isinstance(_cache[key], Exception):
        raise _cache[key]
    return _cache[key]


CASES = [(w, b, p) for (w, b), names in JOBS.items() for p in names]


@pytest.fixture
def results(request, tmp_path_factory):
    world, backend, pattern = request.param

    out = _job(world, backend, tmp_path_factory)
    for rank, res in enumerate(out):
        assert res["_backend"] == backend
        assert res[pattern]["ok"], f"rank {rank}:\n{res[pattern]['error']}"
    return world, [res[pattern]["value"] for res in out]


def _ids(case):
    return f"{case[2]}-{case[1]}-np{case[0]}"


def _check(world: int, pattern: str, vals: list) -> None:
    W = world
    if pattern == "basics":
        for r, v in enumerate(vals):
            assert (v["rank"], v["size"], v["local_rank"], v["local_size"]) == (r, W, r, W)
            assert (v["cross_rank"], v["cross_size"], v["init"], v["homogeneous"]) == (0, 1, True, True)
    elif pattern in ("training", "bpps"):
        for v in vals:
            assert v["vs_single"] < TOL
            if pattern == "training":
                assert v["lr"] == 0.01 and v["ranks_equal"] == 0.0  # rank 0's lr won the broadcast
    elif pattern == "fp16":
        for v in vals:
            assert v["dtype"] == "torch.float32" and v["err"] < 1e-2 and 0 < v["vs_single"] < 1e-3
    elif pattern == "async_ops":
        s = sum(range(2, W + 2))
        prod = 1
        for k in range(2, W + 2):
            prod *= k
        for v in vals:
            assert v["ok"] and v["inplace_is_same"] and v["unchanged"]
            assert v["inplace"] == [float(W - 1)] * 7
            assert v["ops"] == {"avg": s / W, "sum": s, "min": 2.0, "max": W + 1.0, "prod": float(prod)}
            assert v["scaled"] == [float(W)] * 3
            assert v["ints"] == [sum(range(1, W + 1)), 7 * W] and v["int_dtype"] == "torch.int8"
    elif pattern == "grouped":
        tot = sum(range(W))
        gathered = [float(r) for r in range(W) for _ in range(r + 1)]
        for r, v in enumerate(vals):
            assert v["a"] == [float(tot)] * 3 and v["b"] == [[2.0 * tot] * 2] * 2
            assert v["c"] == [tot, W] and v["c_dtype"] == "torch.int64"
            assert v["ga"] == gathered and v["gb"] == [[float(k)] * 2 for k in range(W)]
            assert v["rs"] == [W * (2 * r + j) + tot for j in range(2)]
            assert v["inplace"] == [[tot / W] * 2, [tot / W] * 3]
    elif pattern == "process_sets":
        evens, odds = list(range(0, W, 2)), list(range(1, W, 2))
        for r, v in enumerate(vals):
            mine = evens if r % 2 == 0 else odds
            assert v["in_evens"] == (r % 2 == 0) and v["rank_in_set"] == mine.index(r)
            assert (v["evens_size"], v["odds_size"]) == (len(evens), len(odds))
            assert v["sum"] == float(sum(mine)) and v["gather"] == mine and v["bcast"] == mine[-1] * 10
            assert v["outsider"] == "HorovodError" and v["removed"] is True
    elif pattern == "allgather":
        for v in vals:
            assert v["shape"] == [W * (W + 1) // 2, 2] and v["dtype"] == "torch.int8"
            assert v["rows"] == [r for r in range(W) for _ in range(r + 1)]
            assert v["objs"] == [[r, [r, "x"], [r], True] for r in range(W)]
    elif pattern == "alltoall":
        for r, v in enumerate(vals):
            assert v["received"] == [r + 1] * W
            assert v["firstcol"] == [float(100 * s + r) for s in range(W) for _ in range(r + 1)]
            assert v["even"] == [float(10 * s + 2 * r + j) for s in range(W) for j in range(2)]
    elif pattern == "objects":
        for v in vals:
            assert v == {
                "who": 0,
                "betas_tuple": True,
                "int_key": True,
                "inf": True,
                "t": [0.0, 1.0, 2.0],
                "refused": v["refused"],
            }
            assert v["refused"].startswith("cannot send object at ['bad']")
    elif pattern == "syncbn":
        for v in vals:
            assert max(v.values()) < 1e-4, v
    elif pattern == "join":
        for v in vals:
            assert v["last"] == W - 1 and v["vs_single"] < TOL and v["ranks_equal"] == 0.0
    elif pattern == "join_refuses_broadcast":
        assert vals == ["not supported with Join"] * W
    elif pattern == "mismatch":
        for r, v in enumerate(vals):  # every rank raised, naming both sides, and the group still works
            assert "collective mismatch" in v["shape"] and f"shape [{r + 2}]" in v["shape"]
            assert "HINT:" in v["shape"] and "bad_shape" in v["shape"]
            assert "float64" in v["dtype"] and "float32" in v["dtype"]
            assert v["async"] == "raised at synchronize" and v["after"] == float(W)
    elif pattern == "reducescatter":
        rows = W * 2 + 1
        counts = [rows // W + (1 if r < rows % W else 0) for r in range(W)]
        tot = sum(range(1, W + 1))
        for r, v in enumerate(vals):
            start = sum(counts[:r])
            assert v["rows"] == [float(i * tot) for i in range(start, start + counts[r])]
            assert v["avg"] == [sum(range(W)) / W]
    elif pattern == "adasum":
        for v in vals:
            if W & (W - 1):
                assert "non-power of 2" in v["error"]
            else:
                assert v["err"] < 1e-12
    elif pattern == "timeline":
        assert vals[0]["names"] == ["ALLGATHER", "ALLREDUCE", "NEGOTIATE_ALLGATHER", "NEGOTIATE_ALLREDUCE"]
        assert vals[0]["rows"] == ["gather.me", "grad.w"] and vals[0]["fields_ok"]
    else:  # pragma: no cover
        raise AssertionError(f"no check for pattern {pattern}")


@pytest.mark.parametrize("results", CASES, ids=[_ids(c) for c in CASES], indirect=True)
def test_pattern(results, request):
    world, vals = results
    pattern = request.node.callspec.params["results"][2]
    _check(world, pattern, vals)


HVD_SCRIPT = """
import torch
import disttrain.horovod as hvd

hvd.init()
torch.manual_seed(hvd.rank())
model = torch.nn.Linear(4, 2)
opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                               named_parameters=model.named_parameters())
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
for step in range(3):
    opt.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
w = hvd.allgather(model.weight.detach().reshape(1, -1))
print(f"RESULT rank={hvd.rank()} size={hvd.size()} equal={bool((w == w[0]).all())}", flush=True)
hvd.shutdown()
"""


@pytest.mark.timeout(120)
def test_script_under_disttrain_launch_np(tmp_path):
    """A Horovod script, one import changed, started with horovodrun's -np spelling."""
    script = tmp_path / "train_hvd.py"
    script.write_text(HVD_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "disttrain.cli", "launch", "-np", "2", str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for r in range(2):
        assert f"RESULT rank={r} size=2 equal=True" in out, out


@pytest.mark.timeout(200)
def test_horovod_backend_when_installed():
    """collectives' ``horovod`` backend moves tensors with a real Horovod (skipped where not built)."""
    pytest.importorskip("horovod.torch", reason="Horovod is not installed (scripts/build_horovod.sh builds it)")
    W = 2
    out = spawn("tests.cases.hvd_api:backend_ops", W, timeout=180)
    for r, v in enumerate(out):
        assert v["allreduce"] == [float(sum(range(1, W + 1)))] * 5
        assert v["allgather"] == [[float(k)] * (k + 1) for k in range(W)]
        assert v["broadcast"] == [float(W - 1)] * 3
        assert v["reduce_scatter"] == [float(sum(r + k for k in range(W)))] * 2
        assert v["all_to_all"] == [[float(10 * s + r)] * (r + 1) for s in range(W)]
        assert v["sub"] == [2.0, 2.0]

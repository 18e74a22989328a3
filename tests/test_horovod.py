"""disttrain.horovod: Horovod's documented behaviours, at 2 and 3 ranks, on real processes.

Importing torch dominates a job's cost, so one job per (world size, backend) runs every
pattern of tests/cases/hvd_api.py and tests/cases/hvd_names.py in turn, and each test below
checks one behaviour's result on every rank (a broken pattern fails its own test only).
Parallel results are compared with one process on the same global batch, computed in the job.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.harness import ROOT, spawn

pytestmark = pytest.mark.timeout(300)
TOL = 1e-5
ALL = [
    "basics",
    "training",
    "bpps",
    "fp16",
    "async_ops",
    "grouped",
    "grads",  # before the patterns after which ranks have issued different numbers of unnamed ops
    "process_sets",
    "allgather",
    "alltoall",
    "objects",
    "syncbn",
    "join",
    "join_refuses_broadcast",
    "mismatch",
    "reducescatter",
    "adasum",
    "timeline",
    "orders",
    "rank_dependent",
    "threads",
    "errors",
    "sparse",
    "sets_lifecycle",
    "large",
]
JOBS = {
    (2, "shm"): ALL,
    (3, "shm"): [*ALL, "stall"],
    (2, "torch"): ["training", "join", "orders", "rank_dependent", "errors", "sets_lifecycle", "alltoall", "large"],
}
STALL_S = 6
_cache: dict = {}


def run(world: int, backend: str, pattern: str, tmp_path_factory) -> list:
    """``pattern``'s value on every rank, from the (cached) job for ``world`` ranks over ``backend``."""
    key = (world, backend)
    if key not in _cache:  # a failed job fails every test of it, without rerunning it
        path = str(tmp_path_factory.mktemp("hvd") / "timeline.json")
        try:
            _cache[key] = spawn(
                "tests.cases.hvd_api:patterns",
                world,
                timeout=280,
                args={"names": JOBS[key], "args": {"timeline": {"path": path}}},
                env={
                    "DISTTRAIN_HVD_BACKEND": backend,
                    "DISTTRAIN_HVD_TIMEOUT": "60",
                    "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(STALL_S),
                },
            )
        except Exception as exc:  # RankFailure: keep it for the other tests of this job
            _cache[key] = exc
    if isinstance(_cache[key], Exception):
        raise _cache[key]
    out = []
    for rank, res in enumerate(_cache[key]):
        assert res["_backend"] == backend
        assert res[pattern]["ok"], f"rank {rank}:\n{res[pattern]['error']}"
        out.append(res[pattern]["value"])
    return out


def where(pattern: str) -> list:
    return [pytest.param(w, b, id=f"{b}-np{w}") for (w, b), names in JOBS.items() if pattern in names]


# -- name matching (the engine) ----------------------------------------------------------------
@pytest.mark.parametrize("world,backend", where("orders"))
def test_ops_in_different_orders_complete(world, backend, tmp_path_factory):
    for v in run(world, backend, "orders", tmp_path_factory):
        assert v["sums"] == [[float(sum(range(1, world + 1)))] * (3 + i) for i in range(6)]
        assert v["bcast"] == [float(world - 1)] * 2 and v["gather"] == list(range(world))


@pytest.mark.parametrize("world,backend", where("rank_dependent"))
def test_rank_dependent_loss_under_distributed_optimizer(world, backend, tmp_path_factory):
    for v in run(world, backend, "rank_dependent", tmp_path_factory):
        assert v["vs_single"] < TOL and v["ranks_equal"] == 0.0


@pytest.mark.parametrize("world,backend", where("threads"))
def test_many_threads_submitting(world, backend, tmp_path_factory):
    for v in run(world, backend, "threads", tmp_path_factory):
        assert v["ok"], v["errors"]
        assert v["count"] == 24


@pytest.mark.parametrize("world,backend", where("stall"))
def test_name_missing_on_some_ranks_is_reported_not_hung(world, backend, tmp_path_factory):
    vals = run(world, backend, "stall", tmp_path_factory)
    msg = vals[0]["msg"]
    assert "allreduce.only_rank0" in msg and "stall" in msg
    assert f"ranks {list(range(1, world))}" in msg, msg
    assert all(v["after"] == float(world) for v in vals)
    assert all(v["msg"] is None for v in vals[1:])


@pytest.mark.parametrize("world,backend", where("errors"))
def test_errors_raise_on_every_rank_and_the_next_op_works(world, backend, tmp_path_factory):
    vals = run(world, backend, "errors", tmp_path_factory)
    assert vals[0]["duplicate"].startswith("DuplicateNameError")
    for v in vals:
        assert v["shape"].startswith("HorovodInternalError") and "Mismatched ALLREDUCE tensor shapes" in v["shape"]
        assert f"[{17 + world - 1}, 3]" in v["shape"] and "rank 0:" in v["shape"]
        assert "Mismatched data types" in v["dtype"]
        assert "Mismatched reduction operation" in v["op"]
        assert "dimension 1" in v["gather_dims"]
        assert "Mismatched BROADCAST root ranks" in v["root"]
        assert v["splits"].startswith("ValueError") and "splits" in v["splits"]
        if v["duplicate"] != "not checked":  # rank 0
            assert v["duplicate"].startswith("DuplicateNameError") and "allreduce.e.dup" in v["duplicate"]
        assert v["dup_first"] == [float(world)] * 2
        assert v["after"] == float(world)


@pytest.mark.parametrize("world,backend", where("mismatch"))
def test_async_mismatch_raises_at_synchronize(world, backend, tmp_path_factory):
    for r, v in enumerate(run(world, backend, "mismatch", tmp_path_factory)):
        assert "Mismatched ALLREDUCE tensor shapes" in v["shape"] and f"shape [{r + 2}]" in v["shape"]
        assert "allreduce.bad_shape" in v["shape"]
        assert "float64" in v["dtype"] and "float32" in v["dtype"]
        assert v["async"] == "raised at synchronize" and v["after"] == float(world)


@pytest.mark.parametrize("world,backend", where("sparse"))
def test_sparse_allreduce_equals_dense(world, backend, tmp_path_factory):
    for v in run(world, backend, "sparse", tmp_path_factory):
        assert v["allreduce_err"] < 1e-6
        assert v["optimizer_err"]["False"] < 1e-5 and v["optimizer_err"]["True"] < 1e-5, v


@pytest.mark.parametrize("world,backend", where("sets_lifecycle"))
def test_process_sets_added_removed_readded(world, backend, tmp_path_factory):
    vals = run(world, backend, "sets_lifecycle", tmp_path_factory)
    for r, v in enumerate(vals):
        mine = list(range(r % 2, world, 2))
        for k, rnd in enumerate(v["rounds"]):
            assert rnd["ids"] == vals[0]["rounds"][k]["ids"]  # the same ids everywhere
            assert rnd["sum"] == float(sum(q + k for q in mine)) and rnd["objs"] == mine
            assert rnd["bcast"] == f"from{mine[0]}"
            assert "duplicate process set" in rnd["dup"]
            assert rnd["removed"] == [True, True] and rnd["after_remove"] == [None, None]
        assert len({tuple(rnd["ids"]) for rnd in v["rounds"]}) == 3  # re-added under new ids
        assert v["twice"] is False


@pytest.mark.parametrize("world,backend", where("process_sets"))
def test_process_set_ops(world, backend, tmp_path_factory):
    evens, odds = list(range(0, world, 2)), list(range(1, world, 2))
    for r, v in enumerate(run(world, backend, "process_sets", tmp_path_factory)):
        mine = evens if r % 2 == 0 else odds
        assert v["in_evens"] == (r % 2 == 0) and v["rank_in_set"] == mine.index(r)
        assert (v["evens_size"], v["odds_size"]) == (len(evens), len(odds))
        assert v["sum"] == float(sum(mine)) and v["gather"] == mine and v["bcast"] == mine[-1] * 10
        assert v["outsider"] == "ProcessSetError" and v["removed"] is True


@pytest.mark.parametrize("world,backend", where("join"))
def test_join_with_uneven_batches(world, backend, tmp_path_factory):
    for v in run(world, backend, "join", tmp_path_factory):
        assert v["last"] == world - 1 and v["vs_single"] < TOL and v["ranks_equal"] == 0.0


@pytest.mark.parametrize("world,backend", where("join_refuses_broadcast"))
def test_join_refuses_broadcast_and_allgather(world, backend, tmp_path_factory):
    vals = run(world, backend, "join_refuses_broadcast", tmp_path_factory)
    assert len({v["last"] for v in vals}) == 1 and vals[0]["last"] != 0
    assert vals[0]["errors"] == []
    for v in vals[1:]:
        assert "Broadcast is not supported with Join" in v["errors"][0]
        assert "Allgather is not supported with Join" in v["errors"][1]
    assert all(v["after"] == float(world) for v in vals)


@pytest.mark.parametrize("world,backend", where("large"))
def test_large_allreduces_through_reused_result_buffers(world, backend, tmp_path_factory):
    for v in run(world, backend, "large", tmp_path_factory):
        assert v == {"held": True, "second": True, "third": True, "inplace": True, "parts": True}


# -- the API ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("world,backend", where("basics"))
def test_basics(world, backend, tmp_path_factory):
    for r, v in enumerate(run(world, backend, "basics", tmp_path_factory)):
        assert (v["rank"], v["size"], v["local_rank"], v["local_size"]) == (r, world, r, world)
        assert (v["cross_rank"], v["cross_size"], v["init"], v["homogeneous"]) == (0, 1, True, True)


@pytest.mark.parametrize("world,backend", where("training"))
def test_training_with_broadcast_state_equals_one_process(world, backend, tmp_path_factory):
    for v in run(world, backend, "training", tmp_path_factory):
        assert v["vs_single"] < TOL and v["lr"] == 0.01 and v["ranks_equal"] == 0.0
        assert v["zero_grad_kept"], "zero_grad() left a gradient that is not None (set_to_none) or not zero"


@pytest.mark.parametrize("world,backend", where("bpps"))
def test_backward_passes_per_step(world, backend, tmp_path_factory):
    for v in run(world, backend, "bpps", tmp_path_factory):
        assert v["vs_single"] < TOL


@pytest.mark.parametrize("world,backend", where("fp16"))
def test_fp16_compression(world, backend, tmp_path_factory):
    for v in run(world, backend, "fp16", tmp_path_factory):
        assert v["dtype"] == "torch.float32" and v["err"] < 1e-2 and 0 < v["vs_single"] < 1e-3


@pytest.mark.parametrize("world,backend", where("async_ops"))
def test_async_ops_and_reduce_ops(world, backend, tmp_path_factory):
    s = sum(range(2, world + 2))
    prod = 1
    for k in range(2, world + 2):
        prod *= k
    for v in run(world, backend, "async_ops", tmp_path_factory):
        assert v["ok"] and v["inplace_is_same"] and v["unchanged"]
        assert v["inplace"] == [float(world - 1)] * 7
        assert v["ops"] == {"avg": s / world, "sum": s, "min": 2.0, "max": world + 1.0, "prod": float(prod)}
        assert v["scaled"] == [float(world)] * 3
        assert v["ints"] == [sum(range(1, world + 1)), 7 * world] and v["int_dtype"] == "torch.int8"


@pytest.mark.parametrize("world,backend", where("grouped"))
def test_grouped_ops(world, backend, tmp_path_factory):
    tot = sum(range(world))
    gathered = [float(r) for r in range(world) for _ in range(r + 1)]
    for r, v in enumerate(run(world, backend, "grouped", tmp_path_factory)):
        assert v["a"] == [float(tot)] * 3 and v["b"] == [[2.0 * tot] * 2] * 2
        assert v["c"] == [tot, world] and v["c_dtype"] == "torch.int64"
        assert v["ga"] == gathered and v["gb"] == [[float(k)] * 2 for k in range(world)]
        assert v["rs"] == [world * (2 * r + j) + tot for j in range(2)]
        assert v["inplace"] == [[tot / world] * 2, [tot / world] * 3]


@pytest.mark.parametrize("world,backend", where("allgather"))
def test_allgather_ragged_and_objects(world, backend, tmp_path_factory):
    for v in run(world, backend, "allgather", tmp_path_factory):
        assert v["shape"] == [world * (world + 1) // 2, 2] and v["dtype"] == "torch.int8"
        assert v["rows"] == [r for r in range(world) for _ in range(r + 1)]
        assert v["objs"] == [[r, [r, "x"], [r], True] for r in range(world)]


@pytest.mark.parametrize("world,backend", where("alltoall"))
def test_alltoall(world, backend, tmp_path_factory):
    for r, v in enumerate(run(world, backend, "alltoall", tmp_path_factory)):
        assert v["received"] == [r + 1] * world
        assert v["firstcol"] == [float(100 * s + r) for s in range(world) for _ in range(r + 1)]
        assert v["even"] == [float(10 * s + 2 * r + j) for s in range(world) for j in range(2)]


@pytest.mark.parametrize("world,backend", where("objects"))
def test_broadcast_object(world, backend, tmp_path_factory):
    for v in run(world, backend, "objects", tmp_path_factory):
        assert v["refused"].startswith("cannot send object at ['bad']")
        assert v["set_types"] == ["set"]
        assert v["sets"] == [sorted(map(str, {r, "x", (r, 1)})) for r in range(world)]
        assert {k: v[k] for k in ("who", "betas_tuple", "int_key", "inf", "t")} == {
            "who": 0,
            "betas_tuple": True,
            "int_key": True,
            "inf": True,
            "t": [0.0, 1.0, 2.0],
        }


@pytest.mark.parametrize("world,backend", where("grads"))
def test_gradients_through_grouped_ops_and_reducescatter(world, backend, tmp_path_factory):
    tot = float(sum(range(world)))
    for r, v in enumerate(run(world, backend, "grads", tmp_path_factory)):
        assert v["values"] == [[tot] * 3, [float(world)] * 2]
        assert v["grouped_allreduce"] == [[2.0 * world] * 3, [float(world)] * 2]
        assert v["grouped_allgather"] == [[3.0, 3.0]] * (r + 1)
        assert v["reducescatter_sum"] == [float(world)]
        assert v["reducescatter_avg"] == [1.0]
        assert v["grouped_reducescatter"] == [0.5 * world]


@pytest.mark.parametrize("world,backend", where("syncbn"))
def test_sync_batch_norm(world, backend, tmp_path_factory):
    for v in run(world, backend, "syncbn", tmp_path_factory):
        assert max(v.values()) < 1e-4, v


@pytest.mark.parametrize("world,backend", where("reducescatter"))
def test_reducescatter(world, backend, tmp_path_factory):
    rows = world * 2 + 1
    counts = [rows // world + (1 if r < rows % world else 0) for r in range(world)]
    tot = sum(range(1, world + 1))
    for r, v in enumerate(run(world, backend, "reducescatter", tmp_path_factory)):
        start = sum(counts[:r])
        assert v["rows"] == [float(i * tot) for i in range(start, start + counts[r])]
        assert v["avg"] == [sum(range(world)) / world]


@pytest.mark.parametrize("world,backend", where("adasum"))
def test_adasum(world, backend, tmp_path_factory):
    for v in run(world, backend, "adasum", tmp_path_factory):
        if world & (world - 1):
            assert "non-power of 2" in v["error"]
        else:
            assert v["err"] < 1e-12


@pytest.mark.parametrize("world,backend", where("timeline"))
def test_timeline(world, backend, tmp_path_factory):
    v = run(world, backend, "timeline", tmp_path_factory)[0]
    assert v["names"] == ["ALLGATHER", "ALLREDUCE", "NEGOTIATE_ALLGATHER", "NEGOTIATE_ALLREDUCE"]
    assert v["rows"] == ["allgather.gather.me", "allreduce.grad.w"] and v["fields_ok"]


# -- under `disttrain launch` ----------------------------------------------------------------------
ENV_SCRIPT = """
import os, torch
import disttrain.horovod as hvd
hvd.init()
keys = ["HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE",
        "HOROVOD_CROSS_RANK", "HOROVOD_CROSS_SIZE", "HOROVOD_HOSTNAME"]
env = [os.environ.get(k) for k in keys]
mine = [hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), hvd.cross_rank(), hvd.cross_size()]
agree = [str(v) for v in mine] == env[:6] and env[6] is not None
print(f"ENV rank={hvd.rank()} agree={agree} env={env}", flush=True)
hvd.shutdown()
"""

# The shape of Horovod's examples/pytorch/pytorch_synthetic_benchmark.py (written here, not copied):
# synthetic data, DistributedOptimizer with fp16 compression and Adasum-free Average, parameters
# and optimizer state broadcast from rank 0, timed iterations, img/sec averaged over ranks.
SYNTHETIC = """
import argparse, timeit
import numpy as np
import torch
import torch.nn.functional as F
import disttrain.horovod as hvd

p = argparse.ArgumentParser()
p.add_argument("--fp16-allreduce", action="store_true")
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--num-warmup-batches", type=int, default=1)
p.add_argument("--num-batches-per-iter", type=int, default=2)
p.add_argument("--num-iters", type=int, default=2)
args = p.parse_args()
hvd.init()
torch.set_num_threads(1)
model = torch.nn.Sequential(
    torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2), torch.nn.ReLU(),
    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size())
compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), compression=compression)
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(optimizer, root_rank=0)
data = torch.randn(args.batch_size, 3, 32, 32)
target = torch.LongTensor(args.batch_size).random_() % 10

def benchmark_step():
    optimizer.zero_grad()
    F.cross_entropy(model(data), target).backward()
    optimizer.step()

timeit.timeit(benchmark_step, number=args.num_warmup_batches)
img_secs = []
for _ in range(args.num_iters):
    t = timeit.timeit(benchmark_step, number=args.num_batches_per_iter)
    img_secs.append(args.batch_size * args.num_batches_per_iter / t)
img_sec_mean = np.mean(img_secs)
total = hvd.allreduce(torch.tensor(img_sec_mean), op=hvd.Sum, name="img_sec")
w = hvd.allgather(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).unsqueeze(0))
if hvd.rank() == 0:
    print(f"Total img/sec on {hvd.size()} CPU(s): {float(total):.1f}", flush=True)
print(f"SYNTH rank={hvd.rank()} equal={bool((w == w[0]).all())}", flush=True)
"""


def _launch(tmp_path, source: str, np_: int, *args: str) -> str:
    script = tmp_path / "script.py"
    script.write_text(source)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "disttrain.cli", "launch", "-np", str(np_), str(script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


@pytest.mark.timeout(180)
def test_horovod_environment_under_disttrain_launch(tmp_path):
    """`disttrain launch` sets what horovodrun sets, and hvd.init() agrees with it."""
    out = _launch(tmp_path, ENV_SCRIPT, 3)
    for r in range(3):
        assert f"ENV rank={r} agree=True" in out, out


@pytest.mark.timeout(180)
def test_horovod_synthetic_benchmark_example_under_disttrain_launch(tmp_path):
    """Horovod's synthetic benchmark example, import changed, started with horovodrun's -np spelling."""
    out = _launch(tmp_path, SYNTHETIC, 2, "--fp16-allreduce")
    assert "Total img/sec on 2 CPU(s):" in out, out
    for r in range(2):
        assert f"SYNTH rank={r} equal=True" in out, out


@pytest.mark.timeout(200)
def test_horovod_backend_when_installed():
    """collectives' ``horovod`` backend moves tensors with a real Horovod (skipped where not built)."""
    pytest.importorskip("horovod.torch", reason="Horovod is not installed (scripts/build_horovod.sh builds it)")
    from launcher.store import StoreServer, new_secret

    W, secret = 2, new_secret()
    with StoreServer(secret, job="hvd-backend") as server:  # the authenticated store the launcher would run
        env = {"DISTTRAIN_STORE": server.address, "DISTTRAIN_JOB_SECRET": secret, "DISTTRAIN_JOB_ID": "hvd-backend"}
        out = spawn("tests.cases.hvd_api:backend_ops", W, timeout=180, env=env)
    for r, v in enumerate(out):
        assert v["allreduce"] == [float(sum(range(1, W + 1)))] * 5
        assert v["allgather"] == [[float(k)] * (k + 1) for k in range(W)]
        assert v["broadcast"] == [float(W - 1)] * 3
        assert v["reduce_scatter"] == [float(sum(r + k for k in range(W)))] * 2
        assert v["all_to_all"] == [[float(10 * s + r)] * (r + 1) for s in range(W)]
        assert v["sub"] == [2.0, 2.0]

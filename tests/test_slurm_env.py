"""SLURM without a cluster: hostlists, SLURM's variables into ours, clear errors, sbatch rendering,
and the preemption agreement between real ranks (a signal to one rank stops all at one step)."""

import os

import pytest

from launcher.slurm.errors import SlurmEnvError
from launcher.slurm.hostlist import expand_hostlist, expand_tasks_per_node
from launcher.slurm.place import check_against_config, derive_port, read_slurm_env
from launcher.slurm.requeue import requeue_id
from launcher.slurm.worker import setup_worker
from tests.support.harness import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")
pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    "nodelist, expected",
    [
        ("n1", ["n1"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("gpu[08-11]", ["gpu08", "gpu09", "gpu10", "gpu11"]),
        ("gpu[001-002,010]", ["gpu001", "gpu002", "gpu010"]),
        ("n[9-10]", ["n9", "n10"]),
        ("a[1-2],b[3,5],login", ["a1", "a2", "b3", "b5", "login"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("node-a[1-2]x", ["node-a1x", "node-a2x"]),
    ],
)
def test_hostlist(nodelist, expected):
    assert expand_hostlist(nodelist) == expected


@pytest.mark.parametrize("bad", ["", "n[1-", "n[a-b]", "n[3-1]", "n[1-2]]", "n[[1]]", "a,,b", "n[1-2,]"])
def test_hostlist_rejects(bad):
    with pytest.raises(SlurmEnvError, match="node list|HINT"):
        expand_hostlist(bad)


def test_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(SlurmEnvError, match="SLURM_TASKS_PER_NODE"):
        expand_tasks_per_node("2(x)")


def _env(**kw):
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NTASKS": "4",
        "SLURM_NNODES": "2",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        "SLURM_RESTART_COUNT": "2",
    }
    env.update(kw)
    return {k: v for k, v in env.items() if v is not None}


def test_read_slurm_env():
    p = read_slurm_env(_env())
    assert (p.rank, p.local_rank, p.world_size, p.local_world_size, p.node_rank) == (3, 1, 4, 2, 1)
    assert p.nodes == ("gpu07", "gpu08") and p.first_node == "gpu07" and p.restart_count == 2
    assert requeue_id(_env()) == "4242"
    assert requeue_id(_env(SLURM_ARRAY_JOB_ID="4200", SLURM_ARRAY_TASK_ID="7")) == "4200_7"  # the task, not the array


@pytest.mark.parametrize(
    "change, message",
    [
        ({"SLURM_PROCID": "4"}, "outside SLURM_NTASKS"),
        ({"SLURM_NNODES": "3"}, "3 nodes but node list"),
        ({"SLURM_STEP_TASKS_PER_NODE": "2,1"}, "do not add up"),
        ({"SLURM_STEP_NODELIST": "gpu[07-"}, "unbalanced"),
        ({"SLURM_NTASKS": "four"}, "not an integer"),
        ({"SLURM_JOB_ID": None}, "not inside a SLURM job"),
    ],
)
def test_read_slurm_env_errors(change, message):
    with pytest.raises(SlurmEnvError, match=message):
        read_slurm_env(_env(**change))


def test_config_disagrees_with_slurm():
    p = read_slurm_env(_env())
    check_against_config(p, 2, 2)
    with pytest.raises(SlurmEnvError, match=r"world size of 6 .* SLURM started 4 task\(s\). HINT: srun"):
        check_against_config(p, None, 3)
    with pytest.raises(SlurmEnvError, match="slurm.nodes=4 but SLURM started 2"):
        check_against_config(p, 4, None)


def test_setup_worker_exports_contract(tmp_path):
    env = _env(SLURM_PROCID="2", SLURM_LOCALID="0", DISTTRAIN_MASTER_ADDR="127.0.0.1", DISTTRAIN_JOB_SECRET="s" * 64)
    job = setup_worker(str(tmp_path), env=env)
    assert job is not None and job.server is None  # rank 2 is not the store's host
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("2", "4", "0", "2")
    assert env["DISTTRAIN_RESTART_COUNT"] == "2" and env["MASTER_ADDR"] == "127.0.0.1"
    port = derive_port("4242", "0")
    assert env["DISTTRAIN_STORE"] == f"127.0.0.1:{port}" and env["MASTER_PORT"] == str(port + 1)
    assert derive_port("4242", "1") != port and 1024 < port < 32768
    assert setup_worker(str(tmp_path), env=env) is None  # RANK set: someone else placed this worker


def test_setup_worker_rank0_hosts_store_and_secret_file(tmp_path):
    from launcher.store import StoreClient

    env = _env(
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        DISTTRAIN_MASTER_ADDR="127.0.0.1",
        DISTTRAIN_MASTER_PORT="0",
    )
    env["DISTTRAIN_MASTER_PORT"] = str(__import__("launcher.environment", fromlist=["x"]).free_port())
    job = setup_worker(str(tmp_path), env=env)
    try:
        secret_file = tmp_path / ".slurm-secret-4242.0.2"
        assert secret_file.stat().st_mode & 0o777 == 0o600 and env["DISTTRAIN_JOB_SECRET"] == secret_file.read_text()
        client = StoreClient(env["DISTTRAIN_STORE"], env["DISTTRAIN_JOB_SECRET"], timeout=10)
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
    finally:
        job.close()
    assert not secret_file.exists()


def test_setup_worker_rejects_config_mismatch(tmp_path):
    with pytest.raises(SlurmEnvError, match="slurm.nodes=3"):
        setup_worker(str(tmp_path), nodes=3, env=_env(DISTTRAIN_MASTER_ADDR="127.0.0.1"))


# -- disttrain submit --dry-run ----------------------------------------------------------------
class _Result:
    def __init__(self, returncode, out):
        self.returncode, self.stdout, self.stderr = returncode, out.out, out.err


@pytest.fixture
def _submit(capsys):
    from disttrain.cli import main

    def run(*args):
        code = main(["submit", *args])
        return _Result(code, capsys.readouterr())

    return run


def test_submit_dry_run_renders_from_config(tmp_path, _submit):
    p = _submit(
        DIGITS,
        "--nodes",
        "2",
        "--ntasks-per-node",
        "3",
        "--time",
        "30",
        "--partition",
        "gpu",
        "--dry-run",
        f"run.dir={tmp_path}",
        "slurm.job_name=mnist-big",
        "slurm.extra_sbatch=[--qos=high]",
        "slurm.setup=[module load cuda]",
    )
    assert p.returncode == 0, p.stderr
    s = p.stdout
    for line in (
        "#SBATCH --job-name=mnist-big",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=3",
        "#SBATCH --signal=B:USR1@90",
        "#SBATCH --requeue",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=30",
        "#SBATCH --qos=high",
        f"#SBATCH --output={tmp_path}/slurm/%x-%j.out",
        "module load cuda",
        "trap 'kill -USR1 $SRUN",
        f"-m disttrain.worker {tmp_path}/config.yaml",
    ):
        assert line in s, (line, s)
    assert "{{" not in s and not (tmp_path / "config.yaml").exists()  # dry run writes nothing


def test_submit_array_and_agent_mode(tmp_path, _submit):
    p = _submit(
        DIGITS,
        "--array",
        "0-3",
        "--mode",
        "agent",
        "--nodes",
        "2",
        "--dry-run",
        f"run.dir={tmp_path}",
        "slurm.signal=SIGUSR2",
        "slurm.signal_seconds=120",
        "slurm.requeue=false",
    )
    assert p.returncode == 0, p.stderr
    s = p.stdout
    for line in (
        "#SBATCH --array=0-3",
        "%x-%A_%a.out",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --signal=B:USR2@120",
        "#SBATCH --no-requeue",
        "-m launcher.slurm.agent --nproc-per-node 2",
        '"run.dir=$RUN_DIR"',
        "task_${SLURM_ARRAY_TASK_ID}",
    ):
        assert line in s, (line, s)


def test_submit_template_missing_key(tmp_path, _submit):
    tpl = tmp_path / "mine.sbatch"
    tpl.write_text("#!/bin/bash\n#SBATCH --job-name={{job_name}}\n#SBATCH --account={{account}}\n{{launch}}\n")
    p = _submit(DIGITS, "--template", str(tpl), "--dry-run", f"run.dir={tmp_path}")
    assert p.returncode == 2
    assert f"{tpl}:3: unknown placeholder {{{{account}}}}" in p.stderr and "HINT" in p.stderr, p.stderr


def test_submit_bad_signal_and_unknown_key(tmp_path, _submit):
    p = _submit(DIGITS, "--dry-run", f"run.dir={tmp_path}", "slurm.signal=USR9")
    assert p.returncode == 2 and "slurm.signal: got 'USR9'" in p.stderr, p.stderr
    p = _submit(DIGITS, "--dry-run", "slurm.partiton=gpu")
    assert p.returncode == 2 and "did you mean 'partition'" in p.stderr, p.stderr


# -- the agreed stop step, on real ranks (no SLURM needed) ------------------------------------
def test_signal_to_one_rank_stops_all_at_one_step():
    results = spawn(
        "tests.cases.preempt:signal_one_rank",
        2,
        args={"config": DIGITS, "signal_rank": 1, "signal_step": 3},
        timeout=150,
    )
    stops = {r["stop_step"] for r in results}
    assert len(stops) == 1 and stops.pop() in (3, 4), results  # the next agreement after the signal
    assert all(r["steps"] == r["stop_step"] for r in results)
    assert [r["received"] for r in results] == [None, "SIGUSR1"]

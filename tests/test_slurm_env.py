"""SLURM's variables into ours, without a cluster: one task's place, cross-checks with clear
errors, the store's address, and what an srun-started worker exports (the unit layer).

test_slurm_jobs.py runs the same code under a real slurmctld/slurmd.
"""

import pytest

from launcher.environment import free_port
from launcher.slurm.errors import SlurmEnvError
from launcher.slurm.place import (
    check_against_config,
    contract_env,
    derive_port,
    job_tag,
    read_slurm_env,
    store_endpoint,
)
from launcher.slurm.requeue import requeue_id
from launcher.slurm.worker import setup_worker

pytestmark = pytest.mark.unit


def _env(**kw):
    """Rank 3 of 4: the second task on the second of two nodes, in its third attempt."""
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


CONTRADICTIONS = [
    pytest.param({"SLURM_PROCID": "4"}, "outside SLURM_NTASKS", id="rank-beyond-world"),
    pytest.param({"SLURM_NNODES": "3"}, "3 nodes but node list", id="node-count-vs-node-list"),
    pytest.param({"SLURM_STEP_TASKS_PER_NODE": "2,1"}, "do not add up", id="tasks-per-node-vs-world"),
    pytest.param({"SLURM_NODEID": "2"}, "SLURM_NODEID=2 is outside", id="node-beyond-node-list"),
    pytest.param({"SLURM_LOCALID": "2"}, "SLURM_LOCALID=2 is outside", id="local-rank-beyond-node"),
    pytest.param({"SLURM_STEP_NODELIST": "gpu[07-"}, "unbalanced", id="unreadable-node-list"),
    pytest.param({"SLURM_NTASKS": "four"}, "not an integer", id="non-integer"),
    pytest.param({"SLURM_JOB_ID": None}, "not inside a SLURM job", id="outside-a-job"),
    pytest.param({"SLURM_PROCID": None}, "SLURM_PROCID is not set. HINT", id="no-rank"),
]


def test_place_is_read_from_slurms_variables():
    p = read_slurm_env(_env())
    assert (p.rank, p.local_rank, p.world_size, p.local_world_size, p.node_rank) == (3, 1, 4, 2, 1)
    assert p.nodes == ("gpu07", "gpu08") and p.first_node == "gpu07" and p.restart_count == 2
    assert p.where == "rank 3@gpu08 (job 4242)"


@pytest.mark.parametrize("change, message", CONTRADICTIONS)
def test_contradicting_variables_are_an_error_naming_them(change, message):
    with pytest.raises(SlurmEnvError, match=message):
        read_slurm_env(_env(**change))


def test_requeue_target_is_the_job():
    assert requeue_id(_env()) == "4242"


def test_requeue_target_is_the_array_task_never_the_whole_array():
    assert requeue_id(_env(SLURM_ARRAY_JOB_ID="4200", SLURM_ARRAY_TASK_ID="7")) == "4200_7"


def test_config_agreeing_with_slurm_passes():
    check_against_config(read_slurm_env(_env()), 2, 2)


def test_config_with_another_world_size_is_an_error_with_a_hint():
    with pytest.raises(SlurmEnvError, match=r"world size of 6 .* SLURM started 4 task\(s\). HINT: srun"):
        check_against_config(read_slurm_env(_env()), None, 3)


def test_config_with_another_node_count_is_an_error():
    with pytest.raises(SlurmEnvError, match="slurm.nodes=4 but SLURM started 2"):
        check_against_config(read_slurm_env(_env()), 4, None)


def test_store_port_is_shared_by_a_step_and_differs_across_steps():
    port = derive_port("4242", "0")
    assert port == derive_port("4242", "0") and derive_port("4242", "1") != port
    assert 1024 < port < 32768  # below Linux's ephemeral range


def test_store_endpoint_overrides_come_from_the_batch_script():
    p = read_slurm_env(_env())
    assert store_endpoint(p, {"DISTTRAIN_MASTER_ADDR": "10.0.0.7"}) == ("10.0.0.7", derive_port("4242", "0"))
    assert store_endpoint(p, {"DISTTRAIN_MASTER_ADDR": "10.0.0.7", "DISTTRAIN_MASTER_PORT": "23456"})[1] == 23456
    with pytest.raises(SlurmEnvError, match="DISTTRAIN_MASTER_PORT='x' is not a port"):
        store_endpoint(p, {"DISTTRAIN_MASTER_ADDR": "10.0.0.7", "DISTTRAIN_MASTER_PORT": "x"})


def test_contract_uses_torchruns_names_and_tags_the_attempt():
    env = contract_env(read_slurm_env(_env()), "10.0.0.7", 12345, "s" * 64)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")} == {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
    }
    assert env["MASTER_ADDR"] == "10.0.0.7" and env["MASTER_PORT"] == "12346"
    assert env["DISTTRAIN_STORE"] == "10.0.0.7:12345" and env["DISTTRAIN_HOST"] == "gpu08"
    assert env["DISTTRAIN_RESTART_COUNT"] == env["TORCHELASTIC_RESTART_COUNT"] == "2"
    assert env["DISTTRAIN_JOB_ID"] == job_tag(read_slurm_env(_env())) == "slurm-4242.0.r2"


def test_srun_started_worker_exports_the_contract(tmp_path):
    env = _env(
        SLURM_PROCID="2",
        SLURM_LOCALID="0",
        DISTTRAIN_MASTER_ADDR="127.0.0.1",
        DISTTRAIN_JOB_SECRET="7d1c9a0e5b3f48c2a6e1d09b7f3c5a8e2b4d6f1a9c0e7b3d5f2a8c6e1b4d9f07",
    )
    job = setup_worker(str(tmp_path), env=env)
    assert job is not None and job.server is None  # rank 2 is not the store's host
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("2", "4", "0", "2")
    port = derive_port("4242", "0")
    assert env["DISTTRAIN_STORE"] == f"127.0.0.1:{port}" and env["MASTER_PORT"] == str(port + 1)


def test_worker_placed_by_someone_else_is_left_alone(tmp_path):
    env = _env(RANK="0", WORLD_SIZE="1")  # our agent or torchrun set these
    assert setup_worker(str(tmp_path), env=env) is None and "DISTTRAIN_STORE" not in env


def test_rank0_hosts_the_store_with_a_0600_secret_file_it_removes(tmp_path):
    from launcher.store import StoreClient

    env = _env(
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        DISTTRAIN_MASTER_ADDR="127.0.0.1",
        DISTTRAIN_MASTER_PORT=str(free_port()),
    )
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


def test_rank0_off_the_first_node_is_an_error_with_a_hint(tmp_path):
    env = _env(SLURM_PROCID="0", SLURM_LOCALID="0", SLURMD_NODENAME="gpu08", DISTTRAIN_MASTER_ADDR="127.0.0.1")
    with pytest.raises(SlurmEnvError, match="rank 0 runs on gpu08, not on the first node gpu07.*HINT"):
        setup_worker(str(tmp_path), env=env)


def test_worker_rejects_a_job_unlike_its_config(tmp_path):
    with pytest.raises(SlurmEnvError, match="slurm.nodes=3"):
        setup_worker(str(tmp_path), nodes=3, env=_env(DISTTRAIN_MASTER_ADDR="127.0.0.1"))

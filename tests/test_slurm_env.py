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
    pytest.param(
        {"SLURM_STEP_TASKS_PER_NODE": None, "SLURM_NTASKS": "3", "SLURM_PROCID": "2"},
        "3 task\\(s\\) on 2 node\\(s\\) and neither",
        id="uneven-without-tasks-per-node",
    ),
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
        client = StoreClient(
            env["DISTTRAIN_STORE"], env["DISTTRAIN_JOB_SECRET"], timeout=10, job=env["DISTTRAIN_JOB_ID"]
        )
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


# -- one reader, every layout: what srun sets per task, through launcher's reader, to collectives ----------------
def _srun_tasks(nodelist: str, tasks_per_node: str, **job) -> list[dict]:
    """The variables srun gives every task of a step (block distribution), as SLURM spells them."""
    from launcher.slurm.hostlist import expand_hostlist, expand_tasks_per_node

    nodes, per_node = expand_hostlist(nodelist), expand_tasks_per_node(tasks_per_node)
    world, tasks, rank = sum(per_node), [], 0
    for node_id, count in enumerate(per_node):
        for local in range(count):
            env = {
                "SLURM_JOB_ID": "777",
                "SLURM_STEP_ID": "0",
                "SLURM_PROCID": str(rank),
                "SLURM_LOCALID": str(local),
                "SLURM_NODEID": str(node_id),
                "SLURM_NTASKS": str(world),
                "SLURM_NNODES": str(len(nodes)),
                "SLURM_STEP_NODELIST": nodelist,
                "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
                "SLURMD_NODENAME": nodes[node_id],
                **job,
            }
            tasks.append(env)
            rank += 1
    return tasks


LAYOUTS = [
    # srun -n4 on one node: SLURM sets no SLURM_NTASKS_PER_NODE, only the step's tasks per node
    pytest.param("node1", "4", {}, [[0, 1, 2, 3]], id="srun-n4-one-node"),
    # sbatch -N2 --ntasks-per-node=2; srun
    pytest.param("gpu[07-08]", "2(x2)", {"SLURM_NTASKS_PER_NODE": "2"}, [[0, 1], [2, 3]], id="ntasks-per-node"),
    # srun -n7 on four nodes: 2,2,2,1
    pytest.param("n[1-4]", "2(x3),1", {}, [[0, 1], [2, 3], [4, 5], [6]], id="heterogeneous-2(x3),1"),
    # one task of a job array (its own job id), two tasks on its node
    pytest.param(
        "a01",
        "2",
        {"SLURM_JOB_ID": "503", "SLURM_ARRAY_JOB_ID": "500", "SLURM_ARRAY_TASK_ID": "3"},
        [[0, 1]],
        id="job-array",
    ),
]


@pytest.mark.parametrize("nodelist, per_node, job, ranks_by_node", LAYOUTS)
def test_every_layout_gives_collectives_the_place_launchers_reader_computed(nodelist, per_node, job, ranks_by_node):
    import collectives

    tasks = _srun_tasks(nodelist, per_node, **job)
    world = sum(len(r) for r in ranks_by_node)
    for env in tasks:
        place = read_slurm_env(env)
        exported = {**env, **contract_env(place, "10.0.0.7", 12345, "s" * 64)}
        seen = collectives.read_env(exported)  # what the backends (shm: local_world_size) are given
        node = next(i for i, ranks in enumerate(ranks_by_node) if seen.rank in ranks)
        want = (seen.rank, world, ranks_by_node[node].index(seen.rank), len(ranks_by_node[node]))
        assert (place.rank, place.world_size, place.local_rank, place.local_world_size) == want
        assert (seen.rank, seen.world_size, seen.local_rank, seen.local_world_size) == want
        assert seen.source == "launcher" and seen.host == env["SLURMD_NODENAME"]
        check_against_config(place, place.nnodes, None)  # disttrain's slurm.nodes agrees
    assert sorted(read_slurm_env(t).rank for t in tasks) == list(range(world))


def test_srun_n4_on_one_node_is_four_local_ranks_not_four_nodes():
    place = read_slurm_env(_srun_tasks("node1", "4")[2])
    assert (place.local_rank, place.local_world_size, place.nnodes) == (2, 4, 1)


def test_array_tasks_are_apart_in_requeue_and_in_shared_memory_names():
    a = read_slurm_env(
        _srun_tasks("a01", "2", SLURM_JOB_ID="503", SLURM_ARRAY_JOB_ID="500", SLURM_ARRAY_TASK_ID="3")[0]
    )
    b = read_slurm_env(
        _srun_tasks("a01", "2", SLURM_JOB_ID="504", SLURM_ARRAY_JOB_ID="500", SLURM_ARRAY_TASK_ID="4")[0]
    )
    assert (a.array_job_id, a.array_task_id) == ("500", "3")
    assert job_tag(a) != job_tag(b) and derive_port(a.job_id) != derive_port(b.job_id)
    assert requeue_id({"SLURM_JOB_ID": "503", "SLURM_ARRAY_JOB_ID": "500", "SLURM_ARRAY_TASK_ID": "3"}) == "500_3"


def test_config_asking_for_another_tasks_per_node_is_refused_on_a_heterogeneous_step():
    with pytest.raises(SlurmEnvError, match=r"world size of 8 \(2 per node\) but SLURM started 7"):
        check_against_config(read_slurm_env(_srun_tasks("n[1-4]", "2(x3),1")[0]), None, 2)


def test_collectives_refuses_an_srun_task_nobody_placed_instead_of_guessing():
    import collectives

    raw = _srun_tasks("node1", "4")[1]  # before this, local_world_size fell back to 1 here
    with pytest.raises(collectives.CollectivesError, match=r"task 1 of 4.*\nHINT: call launcher.setup_slurm_worker"):
        collectives.read_env(raw)
    single = {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert collectives.read_env(single).source == "single"  # a one-task step is one process


def test_restart_count_and_array_task_come_from_the_reader():
    from launcher import array_task_id, restart_count

    assert restart_count(_env()) == 2 and restart_count({}) == 0
    assert array_task_id(_env(SLURM_ARRAY_TASK_ID="7")) == "7" and array_task_id(_env()) is None
    with pytest.raises(SlurmEnvError, match="SLURM_RESTART_COUNT='x' is not an integer"):
        restart_count({"SLURM_RESTART_COUNT": "x"})

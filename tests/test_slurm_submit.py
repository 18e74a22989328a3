"""``disttrain submit``: sbatch scripts rendered from the config and the packaged templates.

The unit layer renders with ``--dry-run``. Two tests attack the script for real: one runs a
rendered script with bash (a fake ``srun`` records what it was given), one has a real sbatch
read back quoted values. A value never adds a line or a command to the script.
"""

import glob
import json
import os
import subprocess
import sys

import pytest
import yaml

from disttrain import config as config_mod
from disttrain.cli import main
from disttrain.slurm.script import PLACEHOLDERS, TEMPLATE_KINDS, build_values, packaged_template, render
from disttrain.slurm.submit import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")


def _set(key: str, value) -> str:
    """An override whose value reaches the config exactly (JSON is YAML: quotes, escapes, newlines)."""
    return f"{key}={json.dumps(value)}"


class _Result:
    def __init__(self, returncode, out):
        self.returncode, self.stdout, self.stderr = returncode, out.out, out.err


@pytest.fixture
def dry_run(capsys, tmp_path):
    def run(*args):
        code = main(["submit", DIGITS, "--dry-run", f"run.dir={tmp_path}", *args])
        return _Result(code, capsys.readouterr())

    return run


# -- rendering ------------------------------------------------------------------------------
@pytest.mark.unit
def test_dry_run_renders_the_config_into_sbatch_lines(tmp_path, dry_run):
    p = dry_run(
        *("--nodes", "2", "--ntasks-per-node", "3", "--time", "30", "--partition", "gpu"),
        "slurm.job_name=mnist-big",
        "slurm.extra_sbatch=[--qos=high]",
        "slurm.setup=[module load cuda]",
    )
    assert p.returncode == 0, p.stderr
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
        "-m launcher.slurm.secret",
    ):
        assert line in p.stdout, (line, p.stdout)
    assert "{{" not in p.stdout and not (tmp_path / "config.yaml").exists()  # a dry run writes nothing


@pytest.mark.unit
def test_gpus_per_node_sets_one_task_per_gpu_and_a_cpu_device_is_warned_about(dry_run):
    p = dry_run("--gpus-per-node", "4")
    assert p.returncode == 0 and "#SBATCH --ntasks-per-node=4" in p.stdout, p.stdout
    assert "#SBATCH --gpus-per-node=4" in p.stdout and "warning" not in p.stderr, p.stderr
    p = dry_run("--gpus-per-node", "4", "launch.device=cpu")
    assert p.returncode == 0 and "--gpus-per-node 4 with launch.device=cpu" in p.stderr, p.stderr
    p = dry_run("--gpus-per-node", "4", "--ntasks-per-node", "2")
    assert "2 worker(s) per node for 4 GPU(s)" in p.stderr, p.stderr


@pytest.mark.unit
def test_array_in_agent_mode_starts_one_agent_per_node_and_a_run_dir_per_task(dry_run):
    p = dry_run(
        *("--array", "0-3", "--mode", "agent", "--nodes", "2"),
        "slurm.signal=SIGUSR2",
        "slurm.signal_seconds=120",
        "slurm.requeue=false",
        "launch.hang_timeout=30",
        "launch.hang_stop=false",
    )
    assert p.returncode == 0, p.stderr
    for line in (
        "#SBATCH --array=0-3",
        "%x-%A_%a.out",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --signal=B:USR2@120",
        "#SBATCH --no-requeue",
        "-m launcher.slurm.agent --nproc-per-node 2 --hang-timeout 30 --hang-keep-waiting -m",
        '"run.dir=$RUN_DIR"',
        "task_${SLURM_ARRAY_TASK_ID}",
    ):
        assert line in p.stdout, (line, p.stdout)


@pytest.mark.unit
def test_custom_template_with_an_unknown_placeholder_names_file_and_line(tmp_path, dry_run):
    tpl = tmp_path / "mine.sbatch"
    tpl.write_text("#!/bin/bash\n#SBATCH --job-name={{job_name}}\n#SBATCH --account={{account}}\n{{launch}}\n")
    p = dry_run("--template", str(tpl))
    assert p.returncode == 2
    assert f"{tpl}:3: unknown placeholder {{{{account}}}}" in p.stderr and "HINT" in p.stderr, p.stderr


@pytest.mark.unit
def test_bad_signal_name_fails_at_submission(dry_run):
    p = dry_run("slurm.signal=USR9")
    assert p.returncode == 2 and "slurm.signal: got 'USR9'" in p.stderr, p.stderr


@pytest.mark.unit
def test_misspelt_key_suggests_the_right_one(dry_run):
    p = dry_run("slurm.partiton=gpu")
    assert p.returncode == 2 and "did you mean 'partition'" in p.stderr, p.stderr


@pytest.mark.unit
def test_top_level_folder_points_at_the_packaged_templates_instead_of_copying_them():
    # No copies with placeholders to drift: a README naming every packaged template and how to render one.
    assert os.listdir(os.path.join(ROOT, "slurm")) == ["README.md"]
    with open(os.path.join(ROOT, "slurm", "README.md"), encoding="utf-8") as f:
        text = f.read()
    for kind in TEMPLATE_KINDS:
        assert f"`{kind}.sbatch`" in text and packaged_template(kind).startswith("#!/bin/bash"), kind
    assert "disttrain/slurm/templates/" in text and "--dry-run > job.sbatch" in text


@pytest.mark.unit
@pytest.mark.parametrize("kind", TEMPLATE_KINDS)
def test_packaged_template_uses_only_the_documented_placeholders(kind, tmp_path):
    cfg = config_mod.load(DIGITS, [f"run.dir={tmp_path}"])
    values = build_values(cfg, str(tmp_path / "config.yaml"), str(tmp_path / "submit.sbatch"))
    assert tuple(values) == PLACEHOLDERS
    assert "{{" not in render(packaged_template(kind), values, kind)


# -- values that try to become commands -----------------------------------------------------
LINE_BREAKS = [
    pytest.param(_set("slurm.job_name", "x\ntouch PWNED"), "slurm.job_name", id="job-name-newline"),
    pytest.param(_set("slurm.output", "o.out\ntouch PWNED"), "slurm.output", id="output-newline"),
    pytest.param(_set("slurm.partition", "gpu\r\ntouch PWNED"), "slurm.partition", id="partition-crlf"),
    pytest.param(_set("slurm.time", "30\ntouch PWNED"), "slurm.time", id="time-newline"),
    pytest.param(_set("slurm.extra_sbatch", ["--qos=high\ntouch PWNED"]), "slurm.extra_sbatch[0]", id="extra-newline"),
    pytest.param(_set("run.dir", "/tmp/r\ntouch PWNED"), "run.dir", id="run-dir-newline"),
    pytest.param(_set("slurm.job_name", "x\x00y"), "slurm.job_name", id="job-name-nul"),
]


@pytest.mark.unit
@pytest.mark.parametrize("override, key", LINE_BREAKS)
def test_line_break_in_a_value_is_refused_naming_its_key(override, key, capsys):
    code = main(["submit", DIGITS, "--dry-run", override])
    out = capsys.readouterr()
    assert code == 2 and out.out == "", out.out
    assert f"{key}: got " in out.err and "control character" in out.err and "HINT" in out.err, out.err


@pytest.mark.unit
def test_sbatch_value_that_is_not_plain_is_double_quoted_with_escapes(dry_run):
    p = dry_run(_set("slurm.job_name", 'my "big" job # \\ $(x)'), "slurm.partition=gpu")
    assert p.returncode == 0, p.stderr
    assert '#SBATCH --job-name="my \\"big\\" job # \\\\ $(x)"' in p.stdout.splitlines(), p.stdout
    assert "#SBATCH --partition=gpu" in p.stdout.splitlines()  # plain values stay readable


@pytest.mark.unit
@pytest.mark.parametrize(
    "override, message",
    [
        pytest.param(_set("slurm.worker_module", "x; touch PWNED"), "slurm.worker_module: got", id="worker-module"),
        pytest.param(_set("slurm.array", "0-3 --wrap=id"), "slurm.array: got", id="array"),
    ],
)
def test_names_that_are_not_names_are_refused(override, message, capsys):
    assert main(["submit", DIGITS, "--dry-run", override]) == 2
    assert message in capsys.readouterr().err


HOSTILE_RUN_DIR = "run 'dir' \"q\" $(touch PWNED-run) `touch PWNED-tick`; touch PWNED-semi #x"
HOSTILE_NAME = "$(touch PWNED-name)'\"; touch PWNED-name2 # `id`"


@pytest.mark.timeout(60)
def test_rendered_script_runs_the_job_and_no_injected_command(tmp_path):
    run_dir = tmp_path / HOSTILE_RUN_DIR
    run_dir.mkdir()
    cfg = config_mod.load(
        DIGITS, [_set("run.dir", str(run_dir)), _set("slurm.job_name", HOSTILE_NAME), _set("slurm.partition", "a b")]
    )
    script, _, config_path = prepare(cfg)
    (tmp_path / "job.sbatch").write_text(script)
    bin_dir, cwd, record = tmp_path / "bin", tmp_path / "cwd", tmp_path / "srun.args"
    bin_dir.mkdir()
    cwd.mkdir()
    fake_srun = bin_dir / "srun"  # records its argv and the secret file's mode, like a step that ends at once
    fake_srun.write_text(
        '#!/bin/bash\nprintf "%s\\0" "$@" > "$RECORD"\nstat -c %a "$DISTTRAIN_JOB_SECRET_FILE" > "$RECORD.mode"\n'
    )
    fake_srun.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        RECORD=str(record),
        SLURM_JOB_ID="31",
        SLURM_JOB_NODELIST="n1",
    )
    proc = subprocess.run(["bash", str(tmp_path / "job.sbatch")], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argv = record.read_bytes().decode().split("\0")[:-1]
    assert argv == ["--kill-on-bad-exit=1", sys.executable, "-u", "-m", "disttrain.worker", config_path], argv
    assert config_path == str(run_dir / "config.yaml")
    assert (tmp_path / "srun.args.mode").read_text().strip() == "600"  # the secret existed, 0600, during the step
    assert not (run_dir / ".job-secret-31").exists()  # and is gone after it
    planted = glob.glob(str(tmp_path / "**" / "PWNED*"), recursive=True) + glob.glob("PWNED*")
    assert planted == [], planted


@pytest.mark.timeout(120)
def test_real_sbatch_reads_quoted_values_back_exactly(slurm_cluster, tmp_path):
    name = "we\"ird 'name' # $(x) \\ back"
    run_dir = tmp_path / "run dir"
    with open(DIGITS) as f:
        data = yaml.safe_load(f)
    data["run"]["dir"] = str(run_dir)
    data["slurm"] = {"job_name": name, "extra_sbatch": ["--hold"], "nodes": 1, "ntasks_per_node": 1}
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(data))
    proc = slurm_cluster.run([sys.executable, "-m", "disttrain.cli", "submit", str(config)], cwd=ROOT, timeout=60)
    assert " as job " in proc.stdout, proc.stdout + proc.stderr
    job = proc.stdout.split(" as job ")[1].split(":")[0]
    try:
        got = slurm_cluster.run(["squeue", "-h", "-j", job, "-o", "%j"]).stdout.rstrip("\n")
        assert got == name
        shown = slurm_cluster.run(["scontrol", "show", "job", "-o", job]).stdout
        assert f"StdOut={run_dir}/slurm/" in shown, shown
    finally:
        slurm_cluster.run(["scancel", job], check=False)

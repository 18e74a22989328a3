"""The wheel is what cluster users install: it must work without the repository.

Builds the wheel from the package sources alone (``pip wheel --no-deps --no-build-isolation``,
nothing downloaded), installs it into a fresh virtual environment that sees this
environment's third-party packages (torch, numpy, ...) through a ``.pth`` file but not the
source tree, then, from a temporary directory outside the repository, runs
``disttrain submit --dry-run`` (the sbatch templates must come from the installed package)
and ``disttrain run`` (two workers train a few steps and checkpoint).
"""

import os
import shutil
import site
import subprocess
import sys
import zipfile

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_SOURCES = ("pyproject.toml", "README.md", "disttrain", "launcher", "collectives")
TEMPLATES = ("single_node", "multi_node", "job_array")
pytestmark = pytest.mark.timeout(300)


def _third_party_paths() -> list[str]:
    """This interpreter's site directories, minus any that would expose the source tree."""
    paths = [p for p in sys.path if p.endswith("site-packages")] + site.getsitepackages()
    return [p for p in dict.fromkeys(paths) if os.path.isdir(p) and not os.path.isdir(os.path.join(p, "disttrain"))]


def _run(argv, cwd, timeout=240):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "DISTTRAIN_"))}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(venv dir, the wheel) with only the wheel's disttrain, launcher and collectives installed."""
    base = tmp_path_factory.mktemp("wheel")
    src, dist, venv = base / "src", base / "dist", base / "venv"
    src.mkdir()
    for name in PACKAGE_SOURCES:  # the sources alone: nothing else of the repository can leak in
        copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy2
        kwargs = {"ignore": shutil.ignore_patterns("__pycache__", "*.egg-info")} if copy is shutil.copytree else {}
        copy(os.path.join(ROOT, name), src / name, **kwargs)
    build = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            dist,
            src,
        ],
        cwd=base,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("disttrain-*.whl")
    made = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=base)
    assert made.returncode == 0, made.stderr
    site_dir = next(venv.glob("lib/python3*/site-packages"))
    (site_dir / "zz_third_party.pth").write_text("\n".join(_third_party_paths()) + "\n")
    install = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            venv / "bin" / "python",
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            wheel,
        ],
        cwd=base,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return venv, wheel


@pytest.fixture
def experiment(tmp_path):
    """A config in a directory outside the repository, run from there."""
    with open(os.path.join(ROOT, "configs", "digits.yaml")) as f:
        data = yaml.safe_load(f)
    data["run"].update(name="wheel", dir="runs/wheel")
    data["train"].update(steps=4, log_every=2, eval_every=0)
    data["checkpoint"].update(every=0)
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    return tmp_path


def test_wheel_carries_the_sbatch_templates(venv):
    names = zipfile.ZipFile(venv[1]).namelist()
    missing = [k for k in TEMPLATES if f"disttrain/slurm/templates/{k}.sbatch" not in names]
    assert missing == [], f"the wheel lacks templates {missing}; HINT: [tool.setuptools.package-data] in pyproject.toml"


def test_installed_package_is_the_wheels_not_the_source_tree(venv, tmp_path):
    code = (
        "import importlib.util as u; print(*(u.find_spec(n).origin for n in ('disttrain', 'launcher', 'collectives')))"
    )
    probe = _run([venv[0] / "bin" / "python", "-c", code], tmp_path)  # find, not import: no torch to load
    assert probe.returncode == 0, probe.stderr
    origins = probe.stdout.split()
    assert len(origins) == 3 and all(o.startswith(str(venv[0])) for o in origins), origins


def test_installed_submit_dry_run_renders_from_the_packaged_templates(venv, experiment):
    p = _run([venv[0] / "bin" / "disttrain", "submit", "exp.yaml", "--nodes", "2", "--dry-run"], experiment)
    assert p.returncode == 0, p.stdout + p.stderr
    run_dir = experiment / "runs" / "wheel"
    for line in (
        "#SBATCH --job-name=wheel",
        "#SBATCH --nodes=2",
        f"{venv[0] / 'bin' / 'python'} -m launcher.slurm.secret",
        f"-m disttrain.worker {run_dir / 'config.yaml'}",
    ):
        assert line in p.stdout, (line, p.stdout)


def test_installed_run_trains_from_a_config_outside_the_repository(venv, experiment):
    p = _run([venv[0] / "bin" / "disttrain", "run", "exp.yaml", "--nproc", "2"], experiment)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "done: 4 steps on 2 ranks" in p.stdout, p.stdout
    run_dir = experiment / "runs" / "wheel"
    assert (run_dir / "summary.json").exists() and (run_dir / "checkpoints" / "latest").exists()

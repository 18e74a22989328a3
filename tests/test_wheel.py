"""The wheel is what cluster users install: it must work without the repository, and pull in
no more than it needs.

Builds the wheel from the package sources alone (``pip wheel --no-deps --no-build-isolation``,
nothing downloaded), then installs it into fresh virtual environments that see, through a
``.pth`` file, only what pip would install with it: the closure of the wheel's own
``Requires-Dist`` (plus an extra's) over this environment's installed distributions, linked
into a directory of their own, never the source tree. From a temporary directory outside the
repository it runs ``disttrain --version``, ``disttrain submit --dry-run`` (the sbatch templates
must come from the installed package) and, with the ``examples`` extra, ``disttrain run`` (two
workers train the digits job a few steps and checkpoint; no matplotlib, so no loss.png).
"""

import email
import importlib.metadata as metadata
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_SOURCES = ("pyproject.toml", "README.md", "disttrain", "launcher", "collectives")
TEMPLATES = ("single_node", "multi_node", "job_array")
pytestmark = pytest.mark.timeout(300)


def _requires(wheel, extra: str = "") -> list[Requirement]:
    """The wheel's Requires-Dist that pip installs with it (and with ``extra``)."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(z.read(name))
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": extra})]


def _closure(reqs: list[Requirement]) -> dict[str, metadata.Distribution]:
    """Every installed distribution those requirements pull in, by canonical name (markers evaluated
    for this interpreter, no extras of the dependencies)."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(reqs)
    while todo:
        req = todo.pop()
        key = canonicalize_name(req.name)
        if key in found:
            continue
        found[key] = dist = metadata.distribution(req.name)
        todo.extend(
            r for r in map(Requirement, dist.requires or []) if r.marker is None or r.marker.evaluate({"extra": ""})
        )
    return found


def _link_closure(dists: dict[str, metadata.Distribution], into) -> None:
    """A directory holding exactly those distributions (links to their top-level files and metadata)."""
    into.mkdir()
    for dist in dists.values():
        base = dist.locate_file("")
        for top in sorted({f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}):
            if os.path.exists(base / top) and not (into / top).exists():
                (into / top).symlink_to(base / top)


def _run(argv, cwd, timeout=240):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "DISTTRAIN_"))}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel, built from the package sources alone."""
    base = tmp_path_factory.mktemp("wheel")
    src, dist = base / "src", base / "dist"
    src.mkdir()
    for name in PACKAGE_SOURCES:  # the sources alone: nothing else of the repository can leak in
        copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy2
        kwargs = {"ignore": shutil.ignore_patterns("__pycache__", "*.egg-info")} if copy is shutil.copytree else {}
        copy(os.path.join(ROOT, name), src / name, **kwargs)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    build = _run([*cmd, "-w", dist, src], cwd=base)
    assert build.returncode == 0, build.stdout + build.stderr
    (made,) = dist.glob("disttrain-*.whl")
    return made


def _venv(base, wheel, extra: str = ""):
    """A fresh venv with the wheel installed and only its dependency closure (with ``extra``) visible."""
    venv = base / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=base)
    assert made.returncode == 0, made.stderr
    _link_closure(_closure(_requires(wheel, extra)), base / "deps")
    site_dir = next(venv.glob("lib/python3*/site-packages"))
    (site_dir / "zz_dependencies.pth").write_text(f"{base / 'deps'}\n")
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
    return venv


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel):
    """(venv dir, the wheel): the wheel and what it requires, nothing else."""
    return _venv(tmp_path_factory.mktemp("core"), wheel), wheel


@pytest.fixture(scope="module")
def venv_examples(tmp_path_factory, wheel):
    """The wheel with its ``examples`` extra (scikit-learn for the digits job)."""
    return _venv(tmp_path_factory.mktemp("examples"), wheel, "examples")


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


def test_wheel_pulls_neither_matplotlib_nor_rich_and_has_one_version(venv, tmp_path):
    pulled = set(_closure(_requires(venv[1])))
    assert "torch" in pulled and not pulled & {"matplotlib", "rich"}, sorted(pulled)
    plot = set(_closure(_requires(venv[1], "plot")))
    assert "matplotlib" in plot, sorted(plot)
    probe = _run([venv[0] / "bin" / "python", "-c", "import matplotlib"], tmp_path)
    assert probe.returncode != 0 and "No module named 'matplotlib'" in probe.stderr, probe.stderr
    version = _run([venv[0] / "bin" / "disttrain", "--version"], tmp_path)
    assert version.returncode == 0, version.stderr
    installed = _run(
        [venv[0] / "bin" / "python", "-c", "import importlib.metadata as m; print(m.version('disttrain'))"], tmp_path
    )
    assert version.stdout.split() == ["disttrain", installed.stdout.strip()], (version.stdout, installed.stdout)
    unknown = _run([venv[0] / "bin" / "disttrain", "foo"], tmp_path)
    assert unknown.returncode == 2 and "invalid choice: 'foo'" in unknown.stderr, unknown.stderr


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


def test_installed_run_trains_the_digits_job_with_the_examples_extra(venv_examples, experiment):
    p = _run([venv_examples / "bin" / "disttrain", "run", "exp.yaml", "--nproc", "2"], experiment)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "done: 4 steps on 2 ranks" in p.stdout, p.stdout
    run_dir = experiment / "runs" / "wheel"
    assert (run_dir / "summary.json").exists() and (run_dir / "checkpoints" / "latest").exists()
    assert not (run_dir / "loss.png").exists()  # matplotlib is the plot extra's, not installed here

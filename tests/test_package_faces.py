"""disttrain reaches launcher through its face only: no `launcher.<module>` import anywhere in
disttrain, and every name it takes from `launcher` is one the face exports (and resolves); importing
the library installs no signal handler (only the process entry ``disttrain.worker`` does)."""

import ast
import os

import pytest

import launcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.unit


def _launcher_imports():
    for d, _, files in os.walk(os.path.join(ROOT, "disttrain")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(d, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "launcher":
                    yield path, node.module, [a.name for a in node.names]
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name.split(".")[0] == "launcher":
                            yield path, a.name, []


def test_disttrain_imports_only_names_launcher_exports():
    found = list(_launcher_imports())
    assert found, "disttrain no longer uses launcher?"
    for path, module, names in found:
        rel = os.path.relpath(path, ROOT)
        assert module == "launcher", f"{rel} imports {module}; HINT: export the name from launcher/__init__.py"
        for n in names:
            assert n in launcher.__all__, f"{rel} imports launcher.{n}, which launcher/__init__.py does not export"
            assert getattr(launcher, n) is not None


_SIGNALS_AFTER_IMPORT = """
import json, signal, sys
def handlers():
    return {s.name: repr(signal.getsignal(s)) for s in signal.Signals}
before = handlers()
for name in sys.argv[1:]:
    __import__(name)
after = handlers()
print(json.dumps(sorted(k for k in before if before[k] != after[k])))
"""


def _signals_changed_by_import(*modules: str) -> list[str]:
    import json
    import subprocess
    import sys

    # Inside a SLURM job, where the worker's early handlers would be installed.
    env = {**os.environ, "SLURM_JOB_ID": "4242"}
    out = subprocess.run(
        [sys.executable, "-c", _SIGNALS_AFTER_IMPORT, *modules],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_library_installs_no_signal_handler():
    assert _signals_changed_by_import("disttrain", "disttrain.api", "disttrain.session") == []
    # The process entry does install them: the check above would see it.
    assert _signals_changed_by_import("disttrain.worker") == ["SIGTERM", "SIGUSR1", "SIGUSR2"]

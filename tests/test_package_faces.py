"""disttrain reaches launcher through its face only: no `launcher.<module>` import anywhere in
disttrain, and every name it takes from `launcher` is one the face exports (and resolves)."""

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

"""engine/ is grouped by part and its modules import downwards: no import circles."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from conftest import ROOT

PARTS = ("pipeline", "report", "scoring", "models", "backends")


def _imports(path: str):
    """Module names `path` imports from engine, anywhere in it: an import inside a function
    closes a circle as surely as one at the top (engine/score.py and engine/ray_runner.py did)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("engine"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("engine"))
    return out


def _module_of(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def test_engine_has_its_parts():
    for part in PARTS:
        assert os.path.isfile(os.path.join(ROOT, "engine", part, "__init__.py")), part


def test_no_import_circle():
    graph = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, "engine")):
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(dirpath, f)
                graph[_module_of(p)] = {m for m in _imports(p) if m != "engine"}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack + [m, n]))
            if n not in state:
                visit(n, stack + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_ray_runner_does_not_import_the_command():
    code = ("import sys, engine.scoring.ray_runner; "
            "assert 'engine.scoring.run' not in sys.modules, 'ray_runner pulled in the run-score command'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_preprocess_imports_nothing_from_engine():
    """preprocess/ is the pure hot path: the decode workers (and device processes, through
    preprocess/ringlayout.py) must not import the engine, lazily or not."""
    found = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "preprocess")):
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(dirpath, f)
                found += [(os.path.relpath(p, ROOT), m) for m in _imports(p)]
    assert not found, f"preprocess/ imports engine: {found}"


def test_worker_starts_without_the_engine():
    code = ("import sys, preprocess.worker, preprocess.ringlayout; "
            "bad = sorted(m for m in sys.modules if m == 'engine' or m.startswith('engine.')); "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

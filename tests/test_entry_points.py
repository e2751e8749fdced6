"""The README's commands as a new user types them after `make setup`: `bin/...` started through its
shebang (`/usr/bin/env python3`), from an environment with no venv on PATH, no VIRTUAL_ENV and no
PYTHONPATH. The scripts must find the clone's .venv by themselves (bin/_venv.py) when the Python
that started them lacks the dependencies, and say in one line what to do when there is none.

Two starting Pythons: the `python3` this machine's PATH gives once the venv is taken out (the
literal case; it may or may not have the dependencies), and a bare venv (`--without-pip`, no
site-packages), which has none of them, so the re-exec is always exercised. The runs that need the
clone's .venv skip without one (`make setup` creates it); the failure paths use a copy of bin/ in a
folder of their own and need nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "bin")
CLONE_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
GUARD = "IMAGENET_ENGINE_REEXEC"  # bin/_venv.py's
SCRIPTS = sorted(n for n in os.listdir(BIN) if not n.startswith("_") and not n.endswith(".py"))

needs_clone_venv = pytest.mark.skipif(not os.access(CLONE_PYTHON, os.X_OK),
                                      reason="needs the clone's .venv (make setup)")


def clean_env(first_on_path: str = "") -> dict:
    """os.environ without any venv: the test's own venv and the clone's .venv leave PATH, and
    VIRTUAL_ENV, PYTHONPATH, PYTHONHOME and the re-exec guard go; ``first_on_path`` goes first."""
    drop = {os.path.realpath(p) for p in (os.path.join(ROOT, ".venv", "bin"), os.path.join(sys.prefix, "bin"))}
    if os.environ.get("VIRTUAL_ENV"):
        drop.add(os.path.realpath(os.path.join(os.environ["VIRTUAL_ENV"], "bin")))
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", GUARD)}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and os.path.realpath(p) not in drop]
    env["PATH"] = os.pathsep.join(([first_on_path] if first_on_path else []) + path)
    return env


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """The bin/ folder of a venv with no packages and no access to the system's: its python3 lacks
    numpy, Pillow and torch, as a fresh machine's does."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    bin_dir = str(venv / "bin")
    probe = subprocess.run([os.path.join(bin_dir, "python3"), "-c", "import sys, importlib.util as u; "
                            "sys.exit(any(u.find_spec(m) for m in ('numpy', 'PIL', 'torch')))"], timeout=60)
    assert probe.returncode == 0, "the bare venv can import numpy, PIL or torch: the test would prove nothing"
    return bin_dir


@pytest.fixture(scope="module", params=["system", "bare"])
def env(request, bare_python):
    """A clean environment whose `python3` (what the shebang runs) is this machine's, or a bare one."""
    if request.param == "system" and shutil.which("python3", path=clean_env()["PATH"]) is None:
        pytest.skip("no python3 on PATH once the venv is taken out")
    return clean_env(bare_python if request.param == "bare" else "")


def run(args, env, timeout=240, cwd=ROOT):
    """A command as typed in a shell: the script itself is executed (its shebang picks the Python)."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def tiny_ts(tmp_path_factory):
    """A TorchScript model of a few kilobytes with ImageNet's 1000 outputs (any input size)."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 1000)).eval()
    path = str(tmp_path_factory.mktemp("tiny") / "tiny.ts")
    torch.jit.trace(net, torch.zeros(1, 3, 32, 32)).save(path)
    return path


SMALL = ["--resize", "40", "--crop", "32"]


def test_every_script_starts_with_the_venv_header():
    """A new script in bin/ (make-cache, ...) gets the same lines, or the README's way of running
    it fails after `make setup` (the runs below cover the ones listed in setup.cfg)."""
    assert {"run-eval", "run-bench", "run-score", "export", "make-dataset"} <= set(SCRIPTS)
    for name in SCRIPTS:
        with open(os.path.join(BIN, name)) as f:
            text = f.read()
        assert text.startswith("#!/usr/bin/env python3\n"), name
        assert "_venv.ensure(__file__" in text, f"bin/{name} lacks the header of bin/_venv.py's docstring"
        assert text.index("_venv.ensure(__file__") < text.index("from engine"), \
            f"bin/{name} imports engine (numpy) before checking the dependencies"
        assert os.access(os.path.join(BIN, name), os.X_OK), f"bin/{name} is not executable"


@needs_clone_venv
@pytest.mark.parametrize("name", SCRIPTS)
def test_help_of_every_script(env, name):
    r = run([f"bin/{name}", "--help"], env)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and name in r.stdout.split("\n", 1)[0], r.stdout[:300]


@needs_clone_venv
def test_readme_commands_end_to_end(bare_python, tiny_ts, tmp_path):
    """make-dataset, then run-eval, run-bench and run-score on it with --backend cpu, each started
    by a `python3` that has none of the dependencies."""
    env = clean_env(bare_python)
    data = str(tmp_path / "val")
    r = run(["bin/make-dataset", data, "--images", "6", "--classes", "2", "--workers", "1"], env)
    assert r.returncode == 0, r.stderr
    assert sum(len(files) for _, _, files in os.walk(data)) == 6

    report = str(tmp_path / "report.json")
    r = run(["bin/run-eval", "--data", data, "--backend", "cpu", "--ts", tiny_ts, *SMALL, "--batch-size", "3",
             "--workers", "1", "--compute-only-iters", "1", "--no-progress", "--json", report], env)
    assert r.returncode == 0, r.stderr
    with open(report) as f:
        rep = json.load(f)
    assert rep["images"] == 6 and rep["failed"] == 0 and rep["backend"]["backend"] == "cpu"
    assert "torch" in rep["environment"]

    bench = str(tmp_path / "bench.json")
    r = run(["bin/run-bench", "--backend", "cpu", "--ts", tiny_ts, *SMALL, "--batch-sizes", "1,2",
             "--warmup", "1", "--iterations", "2", "--json", bench], env)
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(bench) > 0

    out = str(tmp_path / "scores")
    r = run(["bin/run-score", "--data", data, "--out", out, "--backend", "cpu", "--ts", tiny_ts, *SMALL,
             "--format", "jsonl", "--batch-size", "3", "--workers", "1", "--no-progress"], env)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(os.path.join(out, "_SUCCESS"))


@needs_clone_venv
def test_started_by_a_python_of_its_own(bare_python, tmp_path):
    """`python3 bin/run-eval ...` (the interpreter named, not the shebang) and a run from another
    directory through a symlink to the script behave the same."""
    env = clean_env()
    r = run([os.path.join(bare_python, "python3"), os.path.join(BIN, "run-eval"), "--help"], env)
    assert r.returncode == 0 and "usage: run-eval" in r.stdout, r.stderr
    link = tmp_path / "run-bench"
    link.symlink_to(os.path.join(BIN, "run-bench"))
    r = run([str(link), "--help"], clean_env(bare_python), cwd=str(tmp_path))
    assert r.returncode == 0 and "usage: run-bench" in r.stdout, r.stderr


def fake_clone(root, venv_python=None):
    """bin/ of this clone copied into ``root`` (no engine/), with no .venv; or, given
    ``venv_python``, one whose ``bin/python`` is a shell script that execs it (so that Python's
    sys.prefix is not ``root/.venv``: only the guard can then stop a second re-exec)."""
    shutil.copytree(BIN, os.path.join(root, "bin"), ignore=shutil.ignore_patterns("__pycache__"))
    if venv_python:
        os.makedirs(os.path.join(root, ".venv", "bin"))
        wrapper = os.path.join(root, ".venv", "bin", "python")
        with open(wrapper, "w") as f:
            f.write(f'#!/bin/sh\nexec "{venv_python}" "$@"\n')
        os.chmod(wrapper, 0o755)
    return root


@pytest.mark.parametrize("name", ["run-eval", "make-dataset"])
def test_no_venv_and_no_dependencies_give_one_line_and_status_2(bare_python, tmp_path, name):
    root = fake_clone(str(tmp_path / "clone"))
    r = run([os.path.join(root, "bin", name), "--help"], clean_env(bare_python), timeout=60)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and not r.stdout, r.stderr
    assert lines[0].startswith(f"{name}: this Python (")
    assert "lacks numpy, Pillow" in lines[0]
    assert f"run `make setup` in {root}" in lines[0] and f"pip install {root}" in lines[0]


def test_a_venv_without_the_dependencies_is_tried_once(bare_python, tmp_path):
    """The clone's .venv exists but lacks them too: one re-exec into it, then the hint (no loop)."""
    venv_python = os.path.join(bare_python, "python3")
    root = fake_clone(str(tmp_path / "clone"), venv_python=venv_python)
    r = run([os.path.join(root, "bin", "run-score"), "--help"], clean_env(bare_python), timeout=60)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "lacks numpy, Pillow, torch, torchvision" in lines[0], r.stderr


def test_a_venv_that_does_not_start_is_named(bare_python, tmp_path):
    root = fake_clone(str(tmp_path / "clone"))
    os.makedirs(os.path.join(root, ".venv", "bin"))
    broken = os.path.join(root, ".venv", "bin", "python")
    with open(broken, "w") as f:
        f.write("#!/nonexistent/interpreter\n")
    os.chmod(broken, 0o755)
    r = run([os.path.join(root, "bin", "export"), "--help"], clean_env(bare_python), timeout=60)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert f"and {broken} does not start" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_guard_does_not_reach_child_processes(bare_python, tmp_path):
    """After the re-exec the guard is gone from the environment, so a bin/ script started by the
    run (a Ray worker, a test) gets its own re-exec."""
    if not os.access(CLONE_PYTHON, os.X_OK):
        pytest.skip("needs the clone's .venv (make setup)")
    probe = tmp_path / "clone"
    fake_clone(str(probe), venv_python=CLONE_PYTHON)
    script = probe / "bin" / "env-probe"
    script.write_text("#!/usr/bin/env python3\nimport os\nimport sys\n\n"
                      "_BIN = os.path.dirname(os.path.realpath(__file__))\n"
                      "sys.path.insert(0, _BIN)\nimport _venv\n\n_venv.ensure(__file__)\n"
                      f"print(sys.prefix, os.environ.get({GUARD!r}))\n")
    script.chmod(0o755)
    r = run([str(script)], clean_env(bare_python), timeout=60)
    assert r.returncode == 0, r.stderr
    prefix, guard = r.stdout.split()
    assert os.path.realpath(prefix) == os.path.realpath(os.path.join(ROOT, ".venv")) and guard == "None"

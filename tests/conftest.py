"""Shared fixtures: synthetic datasets made once per session, and a check at the end of the session
that no test left shared memory or orphaned worker processes behind."""

from __future__ import annotations

import os
import signal
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Tests never reach the network: no weight downloads, here or in the commands they start
# (tests/test_weights.py serves its own files on loopback and unsets this itself).
os.environ["IMAGENET_ENGINE_NO_DOWNLOAD"] = "1"
# ... and the Hugging Face Hub client neither (timm models: tests/test_models.py). Set here, before
# any test module loads the region decoder: on torchvision 0.15 it may live in a dlmopen namespace
# whose own libc keeps the environment array it saw, so the tests add no variables in-process later.
os.environ["HF_HUB_OFFLINE"] = "1"

from engine.procs import pid_alive, worker_processes  # noqa: E402
from engine.pipeline.ring import NAME_PREFIX, SHM_DIR  # noqa: E402


def orphan_workers():
    """Worker processes whose parent (named in their --parent argument) is gone."""
    return [w for w, parent in worker_processes().items() if not pid_alive(parent)]


def leaked_rings():
    """Ring blocks in /dev/shm whose owner process is gone, or owned by this test process."""
    out = []
    for name in os.listdir(SHM_DIR) if os.path.isdir(SHM_DIR) else []:
        if not name.startswith(NAME_PREFIX):
            continue
        pid = int(name[len(NAME_PREFIX):].split("-")[0])
        if pid == os.getpid() or not pid_alive(pid):
            out.append(name)
    return out


@pytest.fixture(scope="session", autouse=True)
def no_leftovers():
    """Fail the session if any test leaked shared memory or left orphan workers (then clean up)."""
    yield
    import time

    deadline = time.monotonic() + 5
    while (orphan_workers() or leaked_rings()) and time.monotonic() < deadline:
        time.sleep(0.2)  # give just-killed processes a moment to be reaped
    orphans, rings = orphan_workers(), leaked_rings()
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)
    for name in rings:
        os.unlink(os.path.join(SHM_DIR, name))
    assert not orphans, f"orphan worker processes were left behind: {orphans}"
    assert not rings, f"shared memory was left in {SHM_DIR}: {rings}"


@pytest.fixture(scope="session")
def folder_set(tmp_path_factory):
    """120 synthetic ImageNet-like JPEGs in wnid folders (10 classes); returns the root."""
    from engine.synthetic import make_dataset

    root = str(tmp_path_factory.mktemp("folder_set"))
    make_dataset(root, 120, 10, layout="folder", seed=11)
    return root


@pytest.fixture(scope="session")
def flat_set(tmp_path_factory):
    """90 synthetic JPEGs in one folder with val_label.txt; returns the root."""
    from engine.synthetic import make_dataset

    root = str(tmp_path_factory.mktemp("flat_set"))
    make_dataset(root, 90, 7, layout="flat", seed=12)
    return root


def run_cli(args, timeout=240, env=None, **kw):
    """Run a bin/ script in a subprocess with the test's Python; returns CompletedProcess."""
    import subprocess

    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update(env or {})
    return subprocess.run([sys.executable] + list(args), capture_output=True, text=True, timeout=timeout,
                          env=e, cwd=ROOT, **kw)


def pytest_configure(config):
    config.addinivalue_line("markers", "packaging: runs pip wheel on a copy of the source tree (needs pip, "
                            "setuptools, wheel; compiling cases need cc and jpeglib.h); tests/test_packaging.py")

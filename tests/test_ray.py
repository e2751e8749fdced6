"""run-score --ray: a local Ray cluster, two actors, one of them killed mid-run.

Skipped when Ray Data is not installed (`pip install '.[ray]'`; `make test` installs it). The
driver runs in its own session with a hard timeout; every process of that session (Ray's
GCS, raylet, workers, actors, decode workers) is gone, or killed and reported, at the end.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_score import ROOT, child_env, make_tiny, predictions, read_rows, run_score, score_cmd  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="Ray is not installed (pip install '.[ray]')")


def _session(sid: int):
    """{pid: command line} of the live processes of a session."""
    out = {}
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                fields = f.read().split(") ")[-1].split()
            if fields[0] == "Z" or int(fields[3]) != sid:
                continue
            with open(f"/proc/{e}/cmdline", "rb") as f:
                out[int(e)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError, ValueError):
            pass
    return out


def _end_session(sid: int, grace: float) -> dict:
    """Wait up to `grace` s for the session to empty, then SIGKILL what is left; returns what was left."""
    deadline = time.monotonic() + grace
    while _session(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _session(sid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@pytest.mark.timeout(300)
def test_ray_two_actors_one_killed_every_id_once(tmp_path):
    data, ref_out, out = str(tmp_path / "data"), str(tmp_path / "ref"), str(tmp_path / "out")
    make_tiny(data, 80, seed=9)
    args = ["--part-size", "5", "--sim-batch-ms", "150"]
    ref = run_score(data, ref_out, *args)
    assert ref.returncode == 0, ref.stderr
    expected = predictions(read_rows(ref_out))

    cmd = score_cmd(data, out, *args, "--ray", "local", "--ray-actors", "2")
    log = open(tmp_path / "driver.log", "w+")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                         env=child_env({"RAY_DEDUP_LOGS": "0"}), start_new_session=True)
    killed = None
    seen = set()  # actor pids: their rings must not outlive the run
    try:
        deadline = time.monotonic() + 200
        while p.poll() is None and time.monotonic() < deadline:
            actors = [pid for pid, c in _session(p.pid).items() if c.startswith("ray::") and "ScoreActor" in c]
            seen.update(actors)
            if killed is None:
                done = [n for n in os.listdir(out) if n.endswith(".done")] if os.path.isdir(out) else []
                if done and len(actors) == 2 and len(done) < 14:
                    killed = actors[0]
                    os.kill(killed, signal.SIGKILL)  # an actor dies mid-run, its decode workers with it
            time.sleep(0.05)
        assert killed is not None, "never saw two actors scoring at once"
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        left = _end_session(p.pid, grace=30)
        log.seek(0)
        output = log.read()
        log.close()
    assert p.returncode == 0, output[-4000:]
    assert predictions(read_rows(out)) == expected  # every id exactly once, as the local run scored it
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    assert not left, f"Ray processes outlived the run by 30 s: {left}"
    rings = [n for n in os.listdir("/dev/shm") if any(n.startswith(f"iengine-{pid}-") for pid in seen)]
    assert not rings, f"rings of the Ray actors were left in /dev/shm: {rings}"

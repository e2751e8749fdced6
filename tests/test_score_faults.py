"""run-score under faults: SIGKILL at random moments, a full disk, SIGTERM.

Each case runs run-score in its own process group with a hard timeout; the session check in
conftest.py fails the run if workers or shared memory outlive it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_score import (ROOT, child_env, done_parts, make_tiny, predictions, read_rows, run_score,  # noqa: E402
                        score_cmd)

KILLS = int(os.environ.get("SCORE_KILLS", "20"))  # issue 6 asks for 20; SCORE_KILLS=200 for a long soak


def _wait_gone(pids, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


from engine.procs import running as _alive  # noqa: E402


def _group(pgid: int):
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    fields = f.read().split(") ")[-1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    out.append(int(e))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _check_invariant(out: str, n: int, part_size: int) -> int:
    """Every part recorded done holds exactly its ids; returns how many are done."""
    if not os.path.exists(os.path.join(out, "run.json")):
        return 0
    rows = read_rows(out)  # asserts each done part holds exactly [lo, hi)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    assert all(0 <= i < n for i in ids)
    return len(done_parts(out))


@pytest.mark.timeout(240)
def test_sigkill_at_random_moments_then_resume_gives_every_id_once(tmp_path):
    data, ref_out, out = str(tmp_path / "data"), str(tmp_path / "ref"), str(tmp_path / "out")
    n, part = 100, 5
    make_tiny(data, n, seed=5)
    args = ("--part-size", str(part), "--sim-batch-ms", "40")
    ref = run_score(data, ref_out, *args)
    assert ref.returncode == 0, ref.stderr
    expected = predictions(read_rows(ref_out))
    rng = random.Random(1234)
    finished_early = 0
    progress = []  # parts done after each kill
    for k in range(KILLS):
        before = len(done_parts(out)) if os.path.exists(os.path.join(out, "run.json")) else 0
        p = subprocess.Popen(score_cmd(data, out, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=child_env(), cwd=ROOT, start_new_session=True)
        try:
            # a random moment: during start-up (imports, manifest, run.json, pool), or a little after
            # the m-th part this run commits (encoding, writing, renaming, recording the next ones)
            m = rng.choice([None, 1, 2, 3]) if k % 4 else None
            if m is None:
                time.sleep(rng.uniform(0.05, 2.5))
            else:
                deadline = time.monotonic() + 60
                while p.poll() is None and time.monotonic() < deadline:
                    if os.path.exists(os.path.join(out, "run.json")) and len(done_parts(out)) >= before + m:
                        break
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.12))
            members = _group(p.pid)
            if p.poll() is not None:
                finished_early += 1
                assert p.returncode == 0
            elif k % 2:
                os.kill(p.pid, signal.SIGKILL)  # the parent alone: its workers must notice and go
            else:
                os.killpg(p.pid, signal.SIGKILL)  # the whole job
            p.wait(timeout=10)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        left = _wait_gone(members)
        assert not left, f"kill {k}: processes outlived the job: {left}"
        progress.append(_check_invariant(out, n, part))
        if os.path.exists(os.path.join(out, "_SUCCESS")):  # all done: start over, keep killing
            for name in os.listdir(out):
                os.unlink(os.path.join(out, name))
    final = run_score(data, out, *args)
    assert final.returncode == 0, final.stderr
    assert predictions(read_rows(out)) == expected  # every id exactly once, the same predictions
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    assert not [name for name in os.listdir(out) if ".tmp-" in name]
    print(f"parts done after each kill: {progress}; runs that finished before their kill: {finished_early}")
    assert finished_early < KILLS // 2, "the kills mostly missed the run"


_FAKE_FULL_DISK = r"""
import errno, os, sys
sys.path.insert(0, {root!r})
import engine.scoring.writer as w
real, calls = w._write_all, [0]

def full_after(fd, data):
    calls[0] += 1
    if calls[0] > {ok_writes}:
        view = memoryview(data).cast("B")
        os.write(fd, view[: len(view) // 2])  # half of it lands, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real(fd, data)

w._write_all = full_after
from engine.scoring.run import run_score_main
sys.exit(run_score_main(sys.argv[1:]))
"""


def _assert_no_half_part(out: str):
    names = os.listdir(out)
    assert not [n for n in names if ".tmp-" in n], names
    rows = read_rows(out)  # every part recorded done holds exactly its rows
    done = done_parts(out)
    for n in names:
        if n.startswith("part-") and not n.endswith(".done"):
            assert int(n[5:10]) in done, f"{n}: a part file without a done record was left behind"
    return rows, done


@pytest.mark.timeout(120)
def test_a_full_disk_records_no_half_written_part_and_says_so(tmp_path):
    data = str(tmp_path / "data")
    make_tiny(data, 30, seed=6)
    # writes: manifest.tsv, run.json, part 0, part-0 record, part 1, part-1 record, then ENOSPC
    for ok_writes in (4, 5):  # the disk fills in a part file, or in its done record
        out = str(tmp_path / f"out{ok_writes}")
        code = _FAKE_FULL_DISK.format(root=ROOT, ok_writes=ok_writes)
        argv = score_cmd(data, out, "--part-size", "10")[2:]
        p = subprocess.run([sys.executable, "-c", code] + argv, capture_output=True, text=True, env=child_env(),
                           cwd=ROOT, timeout=90)
        assert p.returncode == 3, (p.returncode, p.stderr)
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("run-score:")]
        assert len(lines) == 1 and "disk full" in lines[0] and "No space left on device" in lines[0], p.stderr
        rows, done = _assert_no_half_part(out)
        assert sorted(done) == [0] and len(rows) == 10  # at most 2 commits were attempted: part 0 made it
    r = run_score(data, out, "--part-size", "10")  # room again: the resume finishes the job
    assert r.returncode == 0, r.stderr
    assert sorted(r["id"] for r in read_rows(out)) == list(range(30))


@pytest.mark.timeout(120)
def test_a_real_full_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    data, mnt = str(tmp_path / "data"), str(tmp_path / "small")
    make_tiny(data, 40, seed=7)
    os.makedirs(mnt)
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", mnt], capture_output=True, text=True)
    if m.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {m.stderr.strip()}")
    try:
        out = os.path.join(mnt, "out")
        r = run_score(data, out, "--part-size", "4", "--format", "jsonl", "--topk", "50")
        assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("run-score:")]
        assert len(lines) == 1 and "disk full" in lines[0], r.stderr
        rows, done = _assert_no_half_part(out)
        assert 0 < len(done) < 10 and len(rows) == 4 * len(done)
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)


@pytest.mark.timeout(120)
def test_sigterm_stops_keeps_finished_parts_and_resume_completes(tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    make_tiny(data, 60, seed=8)
    p = subprocess.Popen(score_cmd(data, out, "--part-size", "5", "--sim-batch-ms", "80"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=ROOT,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (os.path.isdir(out) and
                                                   any(n.endswith(".done") for n in os.listdir(out))):
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 143, (p.returncode, stderr)
    assert "STOPPED" in stdout and "run the same command again" in stdout
    rows, done = _assert_no_half_part(out)
    assert 0 < len(done) < 12
    r = run_score(data, out, "--part-size", "5")
    assert r.returncode == 0, r.stderr
    assert sorted(r["id"] for r in read_rows(out)) == list(range(60))

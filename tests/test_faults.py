"""Faults: dead and hung workers, signals, a parent killed outright, a full /dev/shm.

Every fault is injected into a `run-eval` subprocess with a hard timeout: workers are made to
crash, hang or raise on chosen images through the test-only hook `IMAGENET_ENGINE_FAULT` (see
preprocess/worker.py), or are killed from here. Each test checks that nothing is left behind
(worker processes, /dev/shm blocks); the session-end check in conftest.py backs that up.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, leaked_rings
from engine.procs import running, worker_processes

EVAL = os.path.join(ROOT, "bin", "run-eval")
N = 40  # images per run: 5 batches of 8
SIM = ["--backend", "sim", "--sim-batch-ms", "1", "--batch-size", "8", "--workers", "2", "--limit", str(N)]
SAME = ("images", "failed", "correct_top1", "correct_top5", "per_class", "dataset_images")


class EvalProcess:
    """`run-eval` in a subprocess; stderr lines are collected with their arrival time."""

    def __init__(self, args, env=None, new_session=False):
        e = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        e.update(env or {})
        self.p = subprocess.Popen([sys.executable, EVAL] + list(args), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=e, cwd=ROOT,
                                  start_new_session=new_session)
        self.pid = self.p.pid
        self.lines = []  # (time.monotonic(), line) from stderr
        self.stdout = ""
        self._cv = threading.Condition()
        self._threads = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_err(self):
        for line in self.p.stderr:
            with self._cv:
                self.lines.append((time.monotonic(), line))
                self._cv.notify_all()

    def _read_out(self):
        self.stdout = self.p.stdout.read()

    @property
    def stderr(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_line(self, *words, timeout=60.0):
        """(arrival time, line) of the first stderr line holding every word."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for t, line in self.lines:
                    if all(w in line for w in words):
                        return t, line
                left = deadline - time.monotonic()
                if left <= 0 or (self.p.poll() is not None and not any(t.is_alive() for t in self._threads[:1])):
                    raise AssertionError(f"no stderr line with {words} within {timeout} s:\n{self.stderr}")
                self._cv.wait(min(left, 0.2))

    def workers(self):
        return _workers_of(self.pid)

    def finish(self, timeout=90.0) -> int:
        try:
            self.p.wait(timeout=timeout)
        finally:
            self.kill()
        for t in self._threads:
            t.join(timeout=5)
        return self.p.returncode

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def _workers_of(parent: int):
    return [w for w, p in worker_processes().items() if p == parent]


def _rings_of(pid: int):
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"iengine-{pid}-")]


def _wait_until(pred, timeout: float, step: float = 0.05) -> float:
    """Seconds until `pred()` held; raises after `timeout`."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)
    return time.monotonic() - t0


def _marker(fault_dir, timeout=60.0):
    """(pid, time.monotonic()) written by a worker just before an injected `-once` fault."""
    _wait_until(lambda: any(os.path.getsize(p) for p in glob.glob(os.path.join(fault_dir, "*"))), timeout)
    path = glob.glob(os.path.join(fault_dir, "*"))[0]
    pid, t = open(path).read().split()
    return int(pid), float(t)


def _nothing_left(pid: int):
    """No worker of the run `pid` alive and no block of it in /dev/shm (other runs on the machine
    are not ours to judge; conftest checks the whole machine at the session's end)."""
    _wait_until(lambda: not [w for w in _workers_of(pid) if running(w)] and not _rings_of(pid), 5)


@pytest.fixture(scope="module")
def names(folder_set):
    """Relative paths of the images a run sees, in order."""
    from engine.pipeline.dataset import build_dataset

    return build_dataset(folder_set, limit=N).paths


@pytest.fixture(scope="module")
def clean_run(folder_set, tmp_path_factory):
    """The report of a run without faults, to compare with."""
    out = tmp_path_factory.mktemp("clean") / "r.json"
    run = EvalProcess(["--data", folder_set, "--json", str(out), "--no-progress"] + SIM)
    assert run.finish() == 0, run.stderr
    return json.loads(out.read_text())


def _fault_run(folder_set, tmp_path, fault, extra=()):
    out = tmp_path / "r.json"
    env = {"IMAGENET_ENGINE_FAULT": fault, "IMAGENET_ENGINE_FAULT_DIR": str(tmp_path)}
    run = EvalProcess(["--data", folder_set, "--json", str(out), "--no-progress"] + SIM + list(extra), env=env)
    return run, out


# -- dead workers -------------------------------------------------------------------------------

def test_sigkilled_worker_is_seen_within_a_second_replaced_and_its_batch_redone(folder_set, names, clean_run,
                                                                               tmp_path):
    # a worker hangs on image 13 (once); we SIGKILL it there, in the middle of a batch
    run, out = _fault_run(folder_set, tmp_path, f"sleep-once:{names[13]}")
    try:
        pid, _ = _marker(tmp_path)
        before = set(run.workers())
        assert pid in before
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        t_seen, line = run.wait_line("warning: worker", "SIGKILL", timeout=30)
        assert names[13] in line and f"pid {pid}" in line, line
        latency = t_seen - t_kill
        print(f"\ndetection latency of a SIGKILLed worker: {latency * 1000:.0f} ms")
        assert latency < 1.0
        _wait_until(lambda: len(set(run.workers()) - before) == 1, 10)  # a replacement was started
        rc = run.finish()
    finally:
        run.kill()
    assert rc == 0, run.stderr
    rep = json.loads(out.read_text())
    assert {k: rep[k] for k in SAME} == {k: clean_run[k] for k in SAME}  # every image once, same counts
    deaths = rep["stages"]["worker_deaths"]
    assert len(deaths) == 1 and deaths[0]["path"].endswith(names[13]) and "SIGKILL" in deaths[0]["how"]
    _nothing_left(run.pid)


def test_segfault_in_native_code_is_seen_within_a_second_and_the_image_redone(folder_set, names, clean_run, tmp_path):
    run, out = _fault_run(folder_set, tmp_path, f"segfault-once:{names[21]}")
    try:
        pid, t_crash = _marker(tmp_path)
        t_seen, line = run.wait_line("warning: worker", "SIGSEGV", timeout=30)
        assert names[21] in line and f"pid {pid}" in line, line
        latency = t_seen - t_crash
        print(f"\ndetection latency of a segfaulted worker: {latency * 1000:.0f} ms")
        assert latency < 1.0
        rc = run.finish()
    finally:
        run.kill()
    assert rc == 0, run.stderr
    rep = json.loads(out.read_text())
    assert {k: rep[k] for k in SAME} == {k: clean_run[k] for k in SAME}
    assert [d["how"] for d in rep["stages"]["worker_deaths"]] == ["was killed by SIGSEGV"]
    _nothing_left(run.pid)


def test_an_image_that_kills_its_worker_twice_is_failed_with_the_cause(folder_set, names, clean_run, tmp_path):
    # four images, four ways to die: a segfault, SIGKILL, an exit, a hang past --image-timeout
    bad = {names[3]: "SIGSEGV", names[12]: "SIGKILL", names[26]: "exited with status 7",
           names[37]: "stuck for over 1 s"}
    faults = ",".join(f"{a}:{names[i]}" for a, i in (("segfault", 3), ("kill", 12), ("exit", 26), ("sleep", 37)))
    run, out = _fault_run(folder_set, tmp_path, faults, ["--image-timeout", "1"])
    try:
        rc = run.finish(timeout=120)
    finally:
        run.kill()
    assert rc == 1, run.stderr  # some images failed, the run went on
    rep = json.loads(out.read_text())
    assert (rep["images"], rep["failed"]) == (N - 4, 4)
    reasons = {f["path"]: f["reason"] for f in rep["failures"]}
    assert set(reasons) == set(bad)
    for p, cause in bad.items():
        reason = reasons[p]
        assert cause in reason and "twice" in reason, reason
    assert len(rep["stages"]["worker_deaths"]) == 8  # each bad image: two deaths, then no more
    assert rep["images"] + rep["failed"] == clean_run["images"]
    _nothing_left(run.pid)


def test_when_workers_keep_dying_the_error_names_worker_image_and_cause(folder_set, tmp_path):
    # every image crashes the decoder (a broken library): stop, do not respawn forever
    run, _ = _fault_run(folder_set, tmp_path, "segfault:.JPEG")
    try:
        rc = run.finish(timeout=120)
    finally:
        run.kill()
    assert rc == 3, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("run-eval: error: workers keep dying"), run.stderr
    assert "worker " in last and "was killed by SIGSEGV while decoding " + folder_set in last, last
    assert "Traceback" not in run.stderr
    _nothing_left(run.pid)


def test_a_bug_in_a_worker_stops_the_run_with_worker_image_and_traceback(folder_set, names, tmp_path):
    run, out = _fault_run(folder_set, tmp_path, f"raise:{names[5]}")
    try:
        rc = run.finish()
    finally:
        run.kill()
    assert rc == 3, run.stderr
    assert "failed on " + os.path.join(folder_set, names[5]) in run.stderr
    assert "RuntimeError: injected fault" in run.stderr and "run_job" in run.stderr  # the worker's traceback
    _nothing_left(run.pid)


# -- signals ------------------------------------------------------------------------------------

def test_second_sigint_forces_the_exit_at_once(folder_set):
    # a slow copy engine (12 s per batch): the first SIGINT waits for the batches in flight,
    # the second must not
    run = EvalProcess(["--data", folder_set, "--backend", "sim", "--sim-batch-ms", "1", "--sim-h2d-gbps", "0.00005",
                       "--compute-only-iters", "1", "--batch-size", "4", "--workers", "2", "--limit", "16"])
    try:
        _wait_until(lambda: len(run.workers()) == 2, 60)
        time.sleep(3)  # batches decoded and in flight on the (slow) copy engine
        run.p.send_signal(signal.SIGINT)
        run.wait_line("SIGINT: stopping", timeout=10)
        time.sleep(0.5)
        assert run.p.poll() is None  # still waiting for the device
        t = time.monotonic()
        run.p.send_signal(signal.SIGINT)
        rc = run.finish(timeout=10)
        took = time.monotonic() - t
    finally:
        run.kill()
    assert rc == 130, run.stderr
    assert took < 2.0, f"the second SIGINT took {took:.1f} s"
    assert "again: exiting at once" in run.stderr
    _nothing_left(run.pid)


def test_sigint_while_loading_the_model_exits_130_without_a_traceback(folder_set, tmp_path):
    """The model is being compiled (the torch_aie stand-in takes 60 s) inside the Session's opening:
    SIGINT ends the run at once with a partial report, status 130 and no traceback."""
    out, log = tmp_path / "r.json", tmp_path / "compiles.jsonl"
    env = {"PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "tests", "fakes"), ROOT]), "FAKE_AIE_COMPILE_S": "60",
           "FAKE_AIE_COMPILE_LOG": str(log), "FAKE_AIE_ACCEPT_UINT8": "1"}
    run = EvalProcess(["--data", folder_set, "--backend", "aie", "--model", "resnet18", "--precision", "fp32",
                       "--json", str(out), "--limit", "8", "--batch-size", "4", "--workers", "1",
                       "--cache-dir", str(tmp_path / "compiled")], env=env)
    try:
        _wait_until(log.exists, 120, step=0.05)  # written as the compile starts
        run.p.send_signal(signal.SIGINT)
        rc = run.finish(timeout=60)
    finally:
        run.kill()
    assert rc == 130, run.stderr
    assert "stopped before the run started" in run.stderr and "Traceback" not in run.stderr
    assert json.loads(out.read_text())["partial"] is True
    _nothing_left(run.pid)


def test_sigint_while_resolving_the_weights_exits_130_without_a_traceback(folder_set):
    """Earlier still, while torch is imported to read the weights' declared preprocessing: one line, 130."""
    run = EvalProcess(["--data", folder_set, "--backend", "cpu", "--model", "resnet18", "--limit", "8"])

    def importing_torch():
        try:
            with open(f"/proc/{run.pid}/maps") as f:
                return "libtorch" in f.read()
        except OSError:
            return False

    try:
        _wait_until(importing_torch, 60, step=0.01)
        run.p.send_signal(signal.SIGINT)
        rc = run.finish(timeout=60)
    finally:
        run.kill()
    assert rc == 130, run.stderr
    assert "SIGINT" in run.stderr and "Traceback" not in run.stderr
    _nothing_left(run.pid)


@pytest.mark.parametrize("group", [False, True], ids=["parent-only", "whole-group"])
def test_parent_killed_outright_leaves_no_workers_and_no_shared_memory(folder_set, names, tmp_path, group):
    """SIGKILL of the parent: workers die with it (PR_SET_PDEATHSIG; one is hung in a decode, so
    EOF on its socket alone would not end it). The block is unlinked by Python's resource tracker;
    when the tracker is killed too (the whole process group), by `cleanup_stale()` at the next start."""
    env = {"IMAGENET_ENGINE_FAULT": f"sleep-once:{names[9]}", "IMAGENET_ENGINE_FAULT_DIR": str(tmp_path)}
    run = EvalProcess(["--data", folder_set] + SIM, env=env, new_session=True)
    try:
        hung, _ = _marker(tmp_path)  # a worker is now hung in a decode
        workers = run.workers()
        assert hung in workers
        assert len(workers) == 2 and _rings_of(run.pid)
        if group:
            os.killpg(run.pid, signal.SIGKILL)
        else:
            os.kill(run.pid, signal.SIGKILL)
        run.p.wait(timeout=10)
        gone = _wait_until(lambda: not any(running(w) for w in workers), 3)
        print(f"\nworkers gone {gone * 1000:.0f} ms after the parent's SIGKILL")
        if group:
            time.sleep(0.5)
            stale = _rings_of(run.pid)
            assert stale, "expected the block to outlive a killed resource tracker"
            from engine.pipeline.ring import Ring

            Ring(2, 1, (8, 8, 3)).close()  # the next start cleans up
            assert not _rings_of(run.pid)
        else:
            _wait_until(lambda: not _rings_of(run.pid), 5)
    finally:
        run.kill()
    _nothing_left(run.pid)


# -- resources ----------------------------------------------------------------------------------

def test_ring_bigger_than_dev_shm_is_refused_with_figures_and_what_to_change(folder_set):
    run = EvalProcess(["--data", folder_set, "--backend", "sim", "--batch-size", "200000", "--no-progress"])
    try:
        rc = run.finish(timeout=60)
    finally:
        run.kill()
    assert rc == 3, run.stderr
    err = run.stderr
    assert "the ring needs" in err and "MiB of shared memory" in err and "MiB free" in err, err
    for hint in ("--batch-size", "--ring-slots", "--shm-size", "/dev/shm"):
        assert hint in err
    assert "Traceback" not in err
    _nothing_left(run.pid)


def test_space_check_uses_the_free_space_of_dev_shm(monkeypatch):
    from engine.pipeline import ring as ring_mod

    class Tiny:  # a 64 MiB mount with 10 MiB free
        f_frsize, f_bsize, f_blocks, f_bavail, f_bfree = 4096, 4096, 16384, 2560, 2560

    monkeypatch.setattr(ring_mod.os, "statvfs", lambda path: Tiny())
    with pytest.raises(ring_mod.RingError) as e:
        ring_mod.Ring(5, 32, (224, 224, 3))  # 23 MiB
    assert "needs 23 MiB" in str(e.value) and "has 10 MiB free" in str(e.value) and "5 slots x batch 32" in str(e.value)
    ring_mod.Ring(2, 8, (224, 224, 3)).close()  # 2.3 MiB fits
    assert not leaked_rings()


def test_ring_pages_are_reserved_so_a_full_mount_fails_at_start_not_mid_run(monkeypatch):
    """tmpfs files are sparse: without the reservation a /dev/shm filled later by others would
    SIGBUS the run half-way. A mount that cannot hold the block fails at creation, cleanly."""
    import errno

    from engine.pipeline import ring as ring_mod

    calls = []

    def full(fd, offset, length):
        calls.append(length)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ring_mod.os, "posix_fallocate", full)
    with pytest.raises(ring_mod.RingError, match="--ring-slots"):
        ring_mod.Ring(3, 4, (64, 64, 3))
    assert calls and not leaked_rings()
    monkeypatch.undo()
    r = ring_mod.Ring(3, 4, (64, 64, 3))
    try:
        st = os.stat(os.path.join("/dev/shm", r.name))
        assert st.st_blocks * 512 >= r.nbytes  # every page allocated up front
    finally:
        r.close()


def test_full_disk_for_the_report_is_a_one_line_error_with_status_3(folder_set, tmp_path):
    """The report cannot be written (a 64 KiB tmpfs, full): exit 3, 'the disk is full', no
    traceback, and not status 1, which would read as 'some images failed'."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    try:
        with open(mnt / "filler", "wb") as f:
            try:
                f.write(b"\0" * (1 << 20))
            except OSError:
                pass
        run = EvalProcess(["--data", folder_set, "--json", str(mnt / "r.json"), "--no-progress"] + SIM)
        try:
            rc = run.finish()
        finally:
            run.kill()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    assert rc == 3, run.stderr
    assert "the disk is full" in run.stderr and "Traceback" not in run.stderr
    assert "images" in run.stdout  # the table was printed before the report file failed

"""run-eval from the command line: bad files are failed images, bad options are one-line errors,
and SIGINT/SIGTERM stop cleanly with a partial report and nothing left behind."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, leaked_rings, orphan_workers, run_cli

EVAL = os.path.join(ROOT, "bin", "run-eval")


@pytest.fixture(scope="module")
def bad_set(folder_set, tmp_path_factory):
    """A copy of 20 good images plus corrupt, truncated, empty and non-image files in class folders."""
    from engine.pipeline.dataset import build_dataset

    root = tmp_path_factory.mktemp("bad_set")
    ds = build_dataset(folder_set, limit=20)
    for p in ds.paths:
        os.makedirs(root / os.path.dirname(p), exist_ok=True)
        shutil.copy(os.path.join(folder_set, p), root / p)
    cls = root / os.path.dirname(ds.paths[0])
    good = open(os.path.join(folder_set, ds.paths[0]), "rb").read()
    (cls / "zz_truncated.JPEG").write_bytes(good[: len(good) // 2])
    (cls / "zz_empty.JPEG").write_bytes(b"")
    (cls / "zz_text.JPEG").write_text("this is not an image\n")
    (cls / "zz_random.JPEG").write_bytes(os.urandom(5000))
    return str(root)


def test_bad_files_are_failed_images_and_the_run_goes_on(bad_set, tmp_path):
    out = tmp_path / "r.json"
    r = run_cli([EVAL, "--data", bad_set, "--backend", "sim", "--sim-batch-ms", "1", "--batch-size", "6",
                 "--workers", "2", "--json", str(out)])
    assert r.returncode == 1, r.stderr  # some images failed
    rep = json.loads(out.read_text())
    assert (rep["images"], rep["failed"]) == (20, 4)
    reasons = {os.path.basename(f["path"]): f["reason"] for f in rep["failures"]}
    assert set(reasons) == {"zz_truncated.JPEG", "zz_empty.JPEG", "zz_text.JPEG", "zz_random.JPEG"}
    assert "empty" in reasons["zz_empty.JPEG"]
    assert "truncated" in reasons["zz_truncated.JPEG"].lower()
    assert "4 failed" in r.stdout and "zz_text.JPEG" in r.stdout
    assert sum(c["images"] for c in rep["per_class"]) == 20  # failed images are never counted


def test_report_fields_and_exit_zero(folder_set, tmp_path):
    out = tmp_path / "r.json"
    r = run_cli([EVAL, "--data", folder_set, "--backend", "sim", "--sim-batch-ms", "2", "--batch-size", "32",
                 "--workers", "2", "--limit", "50", "--json", str(out)])
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    for key in ("top1", "top5", "correct_top1", "correct_top5", "images", "failed", "failures", "per_class",
                "config"):
        assert key in rep
    for key in ("end_to_end", "compute_only", "ratio"):
        assert rep["throughput"][key] > 0
    assert rep["images"] == 50 and rep["config"]["pipeline"]["batch_size"] == 32 and rep["partial"] is False
    for line in ("top-1", "top-5", "end to end", "compute only", "ratio", "stages"):
        assert line in r.stdout
    assert "img/s" in r.stderr  # progress


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/folder"], "no such folder"),
    (["--data", "{tmp}"], "empty folder"),
    (["--data", "{data}", "--labels", "/nonexistent.txt"], "no such file"),
    (["--data", "{data}", "--batch-size", "0"], "must be at least 1"),
    (["--data", "{data}", "--workers", "many"], "expected a whole number"),
    (["--data", "{data}", "--mean", "1,2"], "three comma-separated numbers"),
    (["--data", "{data}", "--interpolation", "cubic"], "invalid choice"),
    (["--data", "{data}", "--weights", "/nonexistent.pth"], "no such file"),
    (["--data", "{data}", "--model", "resnet18", "--weights", "{garbage}"], "not a readable PyTorch state dict"),
    ([], "--data is required"),
])
def test_one_line_errors(folder_set, tmp_path, args, message):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    args = [a.format(tmp=tmp_path, data=folder_set, garbage=garbage) for a in args]
    r = run_cli([EVAL] + args)
    assert r.returncode in (2, 3), r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_with_a_partial_report(folder_set, tmp_path, sig, status):
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, EVAL, "--data", folder_set, "--backend", "sim", "--sim-batch-ms", "300",
                          "--batch-size", "4", "--workers", "2", "--json", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until batches are flowing
            line = p.stderr.readline()
            if line.startswith("scored"):
                break
        p.send_signal(sig)
        t = time.monotonic()
        stdout, stderr = p.communicate(timeout=30)
        assert time.monotonic() - t < 10, "took too long to stop"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == status, stderr
    rep = json.loads(out.read_text())
    assert rep["partial"] is True and 0 < rep["images"] < rep["dataset_images"]
    assert "PARTIAL" in stdout
    time.sleep(0.5)
    assert not orphan_workers()
    assert not leaked_rings()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"iengine-{p.pid}-")]

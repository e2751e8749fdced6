"""`--devices`: one device process per device (engine/pipeline/devices.py), on CPU in CI.

Counts and per-image results through 1, 2 and 4 device processes equal one in-process device's;
a device process killed mid-run loses no image and counts none twice; SIGTERM leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, leaked_rings
from engine.config import ConfigError, parse_devices, resolve_config
from engine.errors import EXIT_DEVICE_LOST, EXIT_USAGE
from engine.pipeline.session import Session

FAKES = os.path.join(ROOT, "tests", "fakes")


def _predictions(cfg, limit=None, on_batch=None):
    """{dataset index: (top-1 class, ok)} of a run through a Session, checking each image comes once."""
    seen = {}

    def reduce(r):
        for row, i in enumerate(r.indices.tolist()):
            assert i not in seen, f"image {i} reduced twice"
            seen[i] = (int(np.argmax(r.logits[row])), bool(r.ok[row]))
        if on_batch is not None:
            on_batch(session, r)

    session = Session(cfg)
    with session:
        session.run(0, len(session.dataset), reduce)
    assert sorted(seen) == list(range(len(session.dataset))), "an image was not reduced"
    return seen, session


def test_parse_devices():
    assert parse_devices("0,1") == (0, 1)
    assert parse_devices("0-3") == (0, 1, 2, 3)
    assert parse_devices("0,2-3") == (0, 2, 3)
    assert parse_devices("all") is None
    for bad in ("", "a", "1-0", "-1", "0,0", "0-1,1"):
        with pytest.raises(ConfigError, match="--devices"):
            parse_devices(bad)
    assert resolve_config(devices="0-2").backend.devices == "0,1,2"


@pytest.mark.parametrize("devices", ["0", "0,1", "0-3"])
def test_sim_devices_equal_one_device(folder_set, devices):
    # 80 ms a batch: slower than one worker decodes one, so batches wait for a free device
    base = resolve_config(data=folder_set, backend="sim", batch_size=8, workers=1, sim_batch_ms=80, progress=False)
    want, _ = _predictions(base.replace(sim_batch_ms=0))
    got, session = _predictions(base.replace(devices=devices))
    assert got == want
    report = session.backend.devices_report(1.0)
    assert [d["id"] for d in report] == list(parse_devices(devices))
    assert sum(d["images"] for d in report) == len(want)
    if devices == "0-3":
        # batches go to whichever device is free, so more than one works
        assert sum(1 for d in report if d["images"]) >= 2


def test_cpu_devices_equal_one_device(folder_set):
    base = resolve_config("resnet18", data=folder_set, backend="cpu", batch_size=16, workers=1, limit=48,
                          progress=False)
    want, _ = _predictions(base)
    got, session = _predictions(base.replace(devices="0,1"))
    assert got == want
    infos = session.backend.devices
    assert all(d.info.get("threads") == 1 for d in infos)  # the cores the worker leaves, shared out


def test_aie_stand_in_two_devices(folder_set, monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", FAKES + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("FAKE_AIE_DEVICES", "2")
    monkeypatch.setenv("FAKE_AIE_ACCEPT_UINT8", "1")
    log = tmp_path / "compiles.jsonl"
    monkeypatch.setenv("FAKE_AIE_COMPILE_LOG", str(log))
    base = resolve_config("resnet18", data=folder_set, backend="cpu", batch_size=16, workers=1, limit=32,
                          progress=False)
    want, _ = _predictions(base)
    cfg = base.replace(backend="aie", precision="fp32", devices="all", cache_dir=str(tmp_path / "compiled"))
    got, session = _predictions(cfg)
    assert [d.id for d in session.backend.devices] == [0, 1]  # `all`: the stand-in's two NPUs
    assert got.keys() == want.keys()
    info = session.describe()
    assert info["backend"] == "aie" and info["devices"] == [0, 1]
    # prepared once: the first device process compiled into the cache, the second loaded it
    assert len(log.read_text().splitlines()) == 1


def test_device_killed_mid_run_loses_nothing(folder_set):
    base = resolve_config(data=folder_set, backend="sim", batch_size=8, workers=1, sim_batch_ms=30, progress=False)
    want, _ = _predictions(base)
    killed = []

    def kill_second(session, r):
        if not killed:
            dev = session.backend.devices[1]
            os.kill(dev.proc.pid, signal.SIGKILL)
            killed.append(dev.id)

    got, session = _predictions(base.replace(devices="0,1"), on_batch=kill_second)
    assert got == want
    lost = session.backend.lost
    assert [d["id"] for d in lost] == [1] and "SIGKILL" in lost[0]["reason"]


def test_backend_error_in_a_device_process(folder_set, monkeypatch):
    monkeypatch.setenv("IMAGENET_ENGINE_DEVICE_FAULT", "raise:1:2")  # device 1 fails at its 2nd batch
    base = resolve_config(data=folder_set, backend="sim", batch_size=8, workers=1, sim_batch_ms=80, progress=False)
    want, _ = _predictions(base)
    got, session = _predictions(base.replace(devices="0,1"))
    assert got == want
    assert "its backend failed" in session.backend.lost[0]["reason"]


def test_every_device_lost_stops_with_an_error(folder_set, monkeypatch):
    from engine.backends.base import BackendError

    monkeypatch.setenv("IMAGENET_ENGINE_DEVICE_FAULT", "raise:0:1")
    base = resolve_config(data=folder_set, backend="sim", batch_size=8, workers=1, sim_batch_ms=5,
                          progress=False, devices="0")
    with pytest.raises(BackendError, match="every device process was lost"):
        _predictions(base)


def test_pixel_cache_fed_devices(folder_set, tmp_path):
    base = resolve_config(data=folder_set, backend="sim", batch_size=8, workers=1, sim_batch_ms=1, progress=False,
                          pixel_cache=str(tmp_path / "pc"))
    want, _ = _predictions(base)  # builds the cache
    got, session = _predictions(base.replace(devices="0,1"))  # reads it: batches are slices of its file
    assert got == want
    assert session.pixel_cache["hits"] == len(want)


def _run_eval(args, env=None, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bin", "run-eval")] + args, capture_output=True,
                          text=True, env=env, timeout=240, **kw)


def test_run_eval_devices_report_and_refusals(folder_set, tmp_path):
    out = tmp_path / "r.json"
    r = _run_eval(["--data", folder_set, "--backend", "sim", "--devices", "0,1", "--workers", "1", "--batch-size",
                   "8", "--sim-batch-ms", "2", "--no-progress", "--json", str(out)])
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert [d["id"] for d in rep["devices"]] == [0, 1]
    assert sum(d["images"] for d in rep["devices"]) == rep["images"] == 120
    assert rep["throughput"]["devices"] == 2 and rep["throughput"]["compute_only_alone_sum"] > 0
    assert "host          compute-only" in r.stdout
    r = _run_eval(["--data", folder_set, "--backend", "cpu", "--devices", "all", "--no-progress"])
    assert r.returncode == 3 and "--devices all: the cpu backend has no devices to count" in r.stderr
    r = _run_eval(["--data", folder_set, "--backend", "sim", "--devices", "0,x", "--no-progress"])
    assert r.returncode == EXIT_USAGE and "--devices needs device ids" in r.stderr


def test_run_eval_device_lost_exit_status(folder_set):
    env = dict(os.environ, IMAGENET_ENGINE_DEVICE_FAULT="raise:1:1")
    r = _run_eval(["--data", folder_set, "--backend", "sim", "--devices", "0,1", "--workers", "1", "--batch-size",
                   "8", "--sim-batch-ms", "80", "--no-progress"], env=env)
    assert r.returncode == EXIT_DEVICE_LOST, r.stderr
    assert "LOST" in r.stdout and "120 scored" in r.stdout


def test_sigterm_stops_every_device_process(folder_set):
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "bin", "run-eval"), "--data", folder_set, "--backend",
                          "sim", "--devices", "0,1", "--workers", "1", "--batch-size", "8", "--sim-batch-ms", "400",
                          "--compute-only-iters", "1", "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    children = []
    while time.monotonic() < deadline and len(children) < 2:
        time.sleep(0.3)
        children = _device_children(p.pid)
    assert len(children) == 2, "the two device processes did not start"
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "partial" in out.lower() or "STOPPED" in out
    time.sleep(0.5)
    assert not [c for c in children if _running(c)], "a device process outlived the run"
    assert not [n for n in leaked_rings() if str(p.pid) in n]
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"iengine-{p.pid}-")]


def _device_children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid and b"engine.pipeline.device_process" in cmd:
                out.append(int(d))
    return out


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_while_a_device_process_compiles(folder_set, tmp_path):
    """The first device process is compiling (the torch_aie stand-in takes 60 s): SIGTERM ends every
    device process and leaves no shared memory."""
    env = dict(os.environ, PYTHONPATH=FAKES + os.pathsep + os.environ.get("PYTHONPATH", ""), FAKE_AIE_DEVICES="2",
               FAKE_AIE_COMPILE_S="60", FAKE_AIE_ACCEPT_UINT8="1")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "bin", "run-eval"), "--data", folder_set, "--backend",
                          "aie", "--devices", "0,1", "--model", "resnet18", "--precision", "fp32", "--workers", "1",
                          "--batch-size", "8", "--cache-dir", str(tmp_path / "cc"), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    children = []
    while time.monotonic() < deadline and len(children) < 2:
        time.sleep(0.3)
        children = _device_children(p.pid)
    assert len(children) == 2, "the two device processes did not start"
    time.sleep(2.0)  # device 0 is in its 60 s compile now
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "stopped before the run started" in err
    time.sleep(0.5)
    assert not [c for c in children if _running(c)], "a device process outlived the run"
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"iengine-{p.pid}-")]


def test_every_device_lost_gives_a_partial_report(folder_set, tmp_path):
    env = dict(os.environ, IMAGENET_ENGINE_DEVICE_FAULT="raise:0:3")
    out = tmp_path / "r.json"
    r = _run_eval(["--data", folder_set, "--backend", "sim", "--devices", "0", "--workers", "1", "--batch-size", "8",
                   "--sim-batch-ms", "5", "--no-progress", "--json", str(out)], env=env)
    assert r.returncode == 3 and "every device process was lost: device 0: its backend failed" in r.stderr
    rep = json.loads(out.read_text())
    assert rep["partial"] and rep["images"] < 120 and rep["devices"][0]["lost"]

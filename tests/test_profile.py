"""Stage accounting, verdict and --trace: the parts of the wall time add up, the verdict names the
bound stage, and the trace is valid trace-event JSON with events from every worker and stream."""

from __future__ import annotations

import json
import os

import pytest

from conftest import ROOT, run_cli
from engine.report.profile import STAGES, breakdown, partition, verdict, workers_needed
from engine.pipeline.scheduler import BatchTiming, PipelineStats
from engine.report.trace import COMPUTE_TID, COPY_TID, DEVICE_PID, REDUCE_TID, WORKERS_PID, build_trace, idle_waiting

EVAL = os.path.join(ROOT, "bin", "run-eval")


def _bt(no, fs, fd, s, c, d, r, n=8):
    return BatchTiming(no, n, fs, fd, s, c, d, r)


def test_partition_gives_each_instant_to_one_stage():
    batches = [
        _bt(0, 0.0, 1.0, 1.0, 1.5, 3.0, 3.2),  # decode 0-1, copy 1-1.5, compute 1.5-3, reduce 3-3.2
        _bt(1, 0.5, 2.0, 3.0, 3.4, 5.0, 5.5),  # its fill overlaps batch 0's device time: not "decode"
    ]
    p = partition(batches, 0.0, 6.0)
    assert p == pytest.approx({"compute": 1.5 + 1.6, "copy": 0.5 + 0.4, "reduce": 0.5,
                               "decode": 1.0, "other": 0.5}, abs=1e-9)
    assert sum(p.values()) == pytest.approx(6.0)


def test_idle_waiting_is_fill_time_with_nothing_on_the_device():
    batches = [_bt(0, 0.0, 1.0, 1.0, 1.5, 3.0, 3.2), _bt(1, 0.5, 4.0, 4.0, 4.1, 5.0, 5.5)]
    assert idle_waiting(batches) == [(0.0, 1.0), (3.2, 4.0)]


def _stats(batches, wall):
    return PipelineStats(wall_s=wall, images=sum(b.images for b in batches), batches=batches)


def test_verdicts():
    # device-bound: the device computes back to back
    dev = [_bt(i, i * 0.1, i * 0.1 + 0.05, 0.1 + i * 0.1, 0.1 + i * 0.1, 0.2 + i * 0.1, 0.2 + i * 0.1)
           for i in range(20)]
    p = breakdown(_stats(dev, 2.1), [{"worker": 0, "images": 160, "busy_s": 1.0}], 1, 82.0, 160)
    assert p["bound"] == "device" and p["verdict"].startswith("device-bound: end to end is 0.9")
    # decode-bound: 2 workers at 50 img/s each, always busy; the device could take 1000
    dec = [_bt(i, 0.0, 0.08 * (i + 1), 0.08 * (i + 1), 0.08 * (i + 1), 0.08 * (i + 1) + 0.008, 0.08 * (i + 1) + 0.009)
           for i in range(20)]
    busy = [{"worker": w, "images": 80, "busy_s": 1.6} for w in range(2)]
    p = breakdown(_stats(dec, 1.61), busy, 2, 1000.0, 160, cores=4)
    assert p["bound"] == "decode"
    assert p["verdict"].startswith("decode-bound: 2 worker(s) deliver 100 img/s, the device takes 1,000; about 22 "
                                   "workers would saturate it (this host has 4 cores")
    assert workers_needed(1000, 100) == 11
    # the same run with idle workers and the time in copies: the copy path is the limit, not decode
    copy = [_bt(i, 0.0, 0.01, 0.08 * i, 0.08 * (i + 1), 0.08 * (i + 1) + 0.001, 0.08 * (i + 1) + 0.002)
            for i in range(20)]
    idle = [{"worker": w, "images": 80, "busy_s": 0.4} for w in range(2)]
    p = breakdown(_stats(copy, 1.61), idle, 2, 1000.0, 160, cores=2)
    assert p["bound"] == "copy" and "try fewer workers" in p["verdict"], p["verdict"]
    assert verdict(dict(p, per_batch=dict(p["per_batch"], batches=1)))[0] == "unknown"


def _trace_run(folder_set, tmp_path, *extra):
    out, trace = tmp_path / "r.json", tmp_path / "t.json"
    r = run_cli([EVAL, "--data", folder_set, "--no-progress", "--json", str(out), "--trace", str(trace),
                 "--backend", "sim"] + list(extra))
    assert r.returncode == 0, r.stderr
    return r, json.loads(out.read_text()), json.loads(trace.read_text())


def test_trace_has_every_worker_and_stream_and_stages_add_up(folder_set, tmp_path):
    r, rep, doc = _trace_run(folder_set, tmp_path, "--workers", "3", "--batch-size", "8", "--limit", "96",
                             "--sim-batch-ms", "20")
    events = doc["traceEvents"]
    assert isinstance(events, list) and events
    for e in events:
        assert e["ph"] in ("X", "M", "b", "e") and isinstance(e["pid"], int) and isinstance(e["tid"], int)
        if e["ph"] != "M":
            assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0 and e["name"]
        if e["ph"] == "X":
            assert e["dur"] >= 0
    slices = [e for e in events if e["ph"] == "X"]
    workers = {w["worker"] for w in rep["stages"]["workers"]}
    assert len(workers) == 3
    assert {e["tid"] - 1 for e in slices if e["pid"] == WORKERS_PID} == workers
    for tid in (COPY_TID, COMPUTE_TID, REDUCE_TID):
        assert sum(1 for e in slices if e["pid"] == DEVICE_PID and e["tid"] == tid) == 12  # one per batch
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names[(DEVICE_PID, COMPUTE_TID)] == "compute (+D2H)" and names[(WORKERS_PID, 1)] == "worker 0"
    assert sum(e["args"]["images"] for e in slices if e["pid"] == WORKERS_PID) == 96
    assert doc["otherData"]["profile"]["verdict"] == rep["profile"]["verdict"]

    # the stage partition adds up to the wall time, and names at least 90 % of it
    prof = rep["profile"]
    assert sum(prof["stages_s"].values()) == pytest.approx(prof["wall_s"], rel=1e-6)
    assert set(prof["stages_s"]) == set(STAGES)
    assert prof["accounted_share"] >= 0.9, prof["stages_s"]
    assert prof["wall_s"] == pytest.approx(rep["stages"]["wall_s"])
    assert "verdict" in r.stdout and "wall time" in r.stdout and "capacity" in r.stdout


def test_device_and_decode_bound_verdicts_end_to_end(folder_set, tmp_path):
    # a slow simulated device (80 img/s) that 2 workers easily feed (fast mode at 32 px: a 1/8-scale decode)
    _, rep, _ = _trace_run(folder_set, tmp_path, "--workers", "2", "--batch-size", "8", "--limit", "120",
                           "--sim-batch-ms", "100", "--compute-only-iters", "3", "--decode", "fast", "--resize", "32",
                           "--crop", "32")
    prof = rep["profile"]
    assert prof["bound"] == "device", prof["verdict"]
    assert prof["stages_share"]["compute"] > 0.85
    # a device 100x faster than one worker can decode
    _, rep, _ = _trace_run(folder_set, tmp_path, "--workers", "1", "--batch-size", "16", "--limit", "64",
                           "--sim-batch-ms", "0.2")
    prof = rep["profile"]
    assert prof["bound"] == "decode", prof["verdict"]
    assert "about" in prof["verdict"] and "workers would saturate it" in prof["verdict"]
    assert prof["decode_capacity"] < prof["device_capacity"]
    assert prof["accounted_share"] >= 0.9, prof["stages_s"]


def test_trace_of_a_synthetic_run_is_serial_per_stream():
    from engine.pipeline.pool import JobSpan

    batches = [_bt(0, 0.0, 1.0, 1.0, 1.2, 2.0, 2.1), _bt(1, 0.2, 1.1, 1.1, 1.3, 3.0, 3.1)]
    spans = [JobSpan(0, 0, 0, 8, 0.0, 1.0), JobSpan(1, 1, 1, 8, 0.2, 1.1)]
    doc = build_trace(batches, spans)
    compute = sorted((e["ts"], e["dur"]) for e in doc["traceEvents"]
                     if e["ph"] == "X" and e["pid"] == DEVICE_PID and e["tid"] == COMPUTE_TID)
    # batch 1 was copied at 1.3 s but the device was busy with batch 0 until 2.0 s
    assert compute == [(pytest.approx(1.2e6), pytest.approx(0.8e6)), (pytest.approx(2.0e6), pytest.approx(1.0e6))]
    json.dumps(doc)


def test_the_verdict_counts_the_devices():
    dec = [_bt(i, 0.0, 0.08 * (i + 1), 0.08 * (i + 1), 0.08 * (i + 1), 0.08 * (i + 1) + 0.008, 0.08 * (i + 1) + 0.009)
           for i in range(20)]
    busy = [{"worker": w, "images": 80, "busy_s": 1.6} for w in range(2)]
    p = breakdown(_stats(dec, 1.61), busy, 2, 1000.0, 160, cores=4, devices=4)
    assert p["devices"] == 4 and p["bound"] == "decode"
    assert "the 4 devices take 1,000; about 22 workers would saturate them" in p["verdict"]

"""`run-bench` (compute-only figures per batch size, --json, --plot, --e2e) and bench/device-check.sh on
the CPU. The aie path of the bench (device time paid in synchronize) is in test_aie_backend.py."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

import engine.report.output  # noqa: F401  (see NOTE below)
from engine.bench import latency_row, parse_batch_sizes, run_bench_main

# NOTE: engine.report.output.Progress binds `stream=sys.stderr` when engine.report.output is first imported; if
# that happened inside a capsys test, later runs would write to capsys's closed stream. Importing it
# here, at collection, binds pytest's session-long stream instead.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_batch_sizes_parse_sorted_unique_and_reject_nonsense():
    assert parse_batch_sizes("8,1,4,8") == [1, 4, 8]
    for bad in ("", "0,4", "a,b", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_batch_sizes(bad)


def test_latency_row_is_batch_over_mean():
    row = latency_row(8, [0.010, 0.010, 0.020, 0.020])
    assert row["latency_ms"]["mean"] == pytest.approx(15.0)
    assert row["latency_ms"]["p50"] == pytest.approx(15.0)
    assert row["img_per_s"] == pytest.approx(8 / 0.015)


def test_sim_bench_json_table_and_plot(tmp_path, capsys):
    js, png = str(tmp_path / "b.json"), str(tmp_path / "b.png")
    status = run_bench_main(["--backend", "sim", "--sim-batch-ms", "4", "--batch-sizes", "1,4,16", "--warmup", "1",
                             "--iterations", "5", "--json", js, "--plot", png])
    assert status == 0
    bench = json.load(open(js))
    assert set(bench) == {"results", "config"}
    assert [r["batch_size"] for r in bench["results"]] == [1, 4, 16]
    for r in bench["results"]:
        assert set(r) == {"batch_size", "img_per_s", "latency_ms"}
        assert set(r["latency_ms"]) == {"mean", "p50", "p99"}
        assert r["latency_ms"]["p50"] >= 4.0 * 0.98  # the simulated device time is paid
        assert r["img_per_s"] == pytest.approx(r["batch_size"] * 1000 / r["latency_ms"]["mean"])
    cfg = bench["config"]
    assert cfg["backend"]["name"] == "sim" and cfg["iterations"] == 5 and cfg["warmup"] == 1
    assert cfg["batch_sizes"] == [1, 4, 16] and cfg["backend_info"]["backend"] == "sim"
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "batch | mean ms | p50 ms | p99 ms" in out and "best: batch 16" in out


def test_plot_without_matplotlib_fails_before_measuring(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    status = run_bench_main(["--backend", "sim", "--batch-sizes", "1", "--plot", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == ["run-bench: error: --plot needs matplotlib (pip install matplotlib)"]


def test_bad_options_are_one_line_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        run_bench_main(["--backend", "sim", "--batch-sizes", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        run_bench_main(["--backend", "sim", "--e2e", str(tmp_path / "missing")])
    assert "no such folder" in capsys.readouterr().err


def test_e2e_column_beside_compute_only(folder_set, tmp_path, capsys):
    js = str(tmp_path / "e.json")
    status = run_bench_main(["--backend", "sim", "--sim-batch-ms", "2", "--batch-sizes", "4,8", "--iterations", "3",
                             "--e2e", folder_set, "--limit", "24", "--workers", "2", "--json", js])
    assert status == 0
    rows = json.load(open(js))["results"]
    for r in rows:
        assert r["end_to_end_img_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["end_to_end_img_per_s"] / r["img_per_s"])
    assert "e2e img/s | e2e/compute" in capsys.readouterr().out


def test_static_prepares_per_batch_size_dynamic_once(monkeypatch, tmp_path):
    """Dynamic shapes: one model, prepared for the largest batch, runs every batch size."""
    from engine.backends.sim import SimBackend

    seen = []
    orig = SimBackend.prepare
    monkeypatch.setattr(SimBackend, "prepare", lambda self, b: (seen.append(b), orig(self, b))[1])
    for shape in ("static", "dynamic"):
        seen.clear()
        js = str(tmp_path / f"{shape}.json")
        assert run_bench_main(["--backend", "sim", "--sim-batch-ms", "1", "--shape", shape, "--batch-sizes", "1,2,8",
                               "--iterations", "2", "--json", js]) == 0
        assert seen == ([1, 2, 8] if shape == "static" else [8])
        assert [r["batch_size"] for r in json.load(open(js))["results"]] == [1, 2, 8]


def test_device_check_script_runs_on_the_cpu(tmp_path):
    """bench/device-check.sh end to end with BACKEND=cpu and tiny sizes: its logic, not its figures."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), PY=sys.executable,
               BACKEND="cpu", PRECISION="fp32", MODEL="resnet18", IMAGES="12", CLASSES="3", BATCH_SIZES="1,2",
               ITERATIONS="2", WARMUP="1", WORKERS="2", EXTRA="--resize 40 --crop 32")
    p = subprocess.run(["bash", os.path.join(ROOT, "bench", "device-check.sh")], capture_output=True, text=True,
                       timeout=420, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["backend"] == "cpu" and summary["images"] == 12 and summary["failed"] == 0
    assert summary["batch_size"] in (1, 2)
    assert summary["end_to_end_img_per_s"] > 0 and summary["compute_only_bench_img_per_s"] > 0
    assert "ratio" in p.stdout and "end to end" in p.stdout
    assert {"bench.json", "bench.txt", "eval.json", "eval.txt", "summary.json"} <= set(os.listdir(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "data")  # bulky files stay in WORK

"""--workers auto / --batch-size auto: the choices follow the measurements, and say why."""

from __future__ import annotations

import json
import os

import pytest

from conftest import ROOT, run_cli
from engine.pipeline.autotune import BATCH_CANDIDATES, batch_fits, choose_batch, choose_workers, measure_decode
from engine.procs import usable_cores
from engine.cli import eval_parser

EVAL = os.path.join(ROOT, "bin", "run-eval")


def test_choose_workers_follows_the_device():
    assert choose_workers(100.0, 50.0, 16)[0] == 1
    assert choose_workers(100.0, 1000.0, 16)[0] == 11  # 1.1 x 1000 / 100
    n, why = choose_workers(100.0, 5000.0, 16)
    assert n == 15 and "capped at 15 of the 16 usable cores (one left for this process)" in why
    assert "55 worker(s)" in why
    assert choose_workers(100.0, 5000.0, 2)[0] == 2  # on 2 cores both decode
    picks = [choose_workers(300.0, rate, 8)[0] for rate in (10, 300, 900, 3000, 30000)]
    assert picks == sorted(picks) and picks[0] < picks[-1]


def test_choose_workers_on_the_cpu_backend_balances_the_cores():
    # one worker decodes 300 img/s; the model does 400 img/s on 8 threads (50 per thread)
    n, why = choose_workers(300.0, 400.0, 8, cpu_backend=True, threads_measured=8)
    assert n == 1 and "7 thread(s)" in why  # min(300, 350) = 300 beats min(600, 300) = 300 with fewer workers
    n, _ = choose_workers(30.0, 4000.0, 8, cpu_backend=True, threads_measured=8)
    assert n == 7  # slow decode, fast model: most cores decode


def test_choose_batch_takes_the_smallest_near_the_best():
    assert choose_batch({8: 100.0, 16: 180.0, 32: 300.0, 64: 310.0, 128: 312.0})[0] == 32
    b, why = choose_batch({8: 100.0, 16: 200.0})
    assert b == 16 and "8: 100" in why


def test_shared_memory_budget_limits_the_batch():
    per_image = 224 * 224 * 3
    assert batch_fits(256, 5, per_image, None)
    free = 5 * 64 * per_image * 2  # room for batch 64 at half the free space
    assert [b for b in BATCH_CANDIDATES if batch_fits(b, 5, per_image, free)] == [8, 16, 32, 64]


def test_measure_decode_times_the_run_mode(folder_set):
    from engine.config import PreprocessSpec
    from engine.pipeline.dataset import build_dataset

    ds = build_dataset(folder_set)
    paths = [ds.abspath(i) for i in range(len(ds))]
    r = measure_decode(paths, PreprocessSpec(decode="fast"), sample=8)
    assert r["images"] == 8 and r["img_per_s"] > 0 and r["mode"] == "fast"


def test_cli_accepts_auto_for_run_eval_only():
    a = eval_parser().parse_args(["--data", "x", "--workers", "auto", "--batch-size", "auto"])
    assert (a.workers, a.batch_size) == (0, 0)
    with pytest.raises(SystemExit):
        eval_parser().parse_args(["--data", "x", "--workers", "0"])


def _auto_run(folder_set, tmp_path, *extra):
    out = tmp_path / f"r{len(list(tmp_path.iterdir()))}.json"
    r = run_cli([EVAL, "--data", folder_set, "--backend", "sim", "--no-progress", "--limit", "32",
                 "--compute-only-iters", "2", "--json", str(out)] + list(extra))
    assert r.returncode == 0, r.stderr
    return r, json.loads(out.read_text())


ROOM = usable_cores() - 1 if usable_cores() >= 4 else usable_cores()  # cores left for workers


@pytest.mark.skipif(ROOM < 2, reason="needs 2 cores to have a choice")
def test_workers_auto_picks_more_workers_for_a_faster_device(folder_set, tmp_path):
    # 16 images per 400 ms: 40 img/s, one worker keeps up; 16 per 0.2 ms: 80,000 img/s, none does
    r_slow, slow = _auto_run(folder_set, tmp_path, "--workers", "auto", "--batch-size", "16", "--sim-batch-ms", "400")
    r_fast, fast = _auto_run(folder_set, tmp_path, "--workers", "auto", "--batch-size", "16", "--sim-batch-ms", "0.2")
    assert slow["config"]["pipeline"]["workers"] == slow["autotune"]["workers"]["value"] == 1
    assert fast["config"]["pipeline"]["workers"] == fast["autotune"]["workers"]["value"] == ROOM
    assert fast["config"]["pipeline"]["workers"] > slow["config"]["pipeline"]["workers"]
    assert "--workers auto: 1 (one worker decodes" in r_slow.stderr
    assert "capped at" in r_fast.stderr and "auto          --workers" in r_fast.stdout
    assert len(fast["stages"]["workers"]) == ROOM  # the run used them


def test_batch_size_auto_measures_every_candidate(folder_set, tmp_path):
    r, rep = _auto_run(folder_set, tmp_path, "--batch-size", "auto", "--workers", "1", "--sim-batch-ms", "2")
    tune = rep["autotune"]["batch_size"]
    assert [int(b) for b in tune["compute_img_per_s"]] == list(BATCH_CANDIDATES)
    # the sim device spends the same time on any batch, so the largest batch is the fastest
    assert rep["config"]["pipeline"]["batch_size"] == tune["value"] == max(BATCH_CANDIDATES)
    assert "--batch-size auto: 256" in r.stderr and rep["images"] == 32

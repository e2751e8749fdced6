#!/usr/bin/env python3
"""Bulk scoring overhead: run-score img/s against run-eval on the same images and backend.

Both run the same pipeline (ring, decode workers, backend); run-score adds softmax + top-k per
batch, routing rows into parts, and the writer thread (encode, fsync, rename, done record).
Target: run-score / run-eval >= 0.95 (the writer costs under 5%).

Two cases, each measured in alternation (eval, score, eval, score, ...) in this one run and
reported as medians of the pipeline's own wall time (worker start and compute-only excluded):
  photos  synthetic ImageNet-like JPEGs at 224 px (decode-bound, like real data)
  tiny    20x24 PNGs cropped to 16 px: thousands of img/s, the writer's worst case
Small parts (--part-size) make the writer commit often within the measured time.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile

from _common import ROOT, bench_data, result_block


def tiny_data(images: int) -> str:
    import numpy as np
    from PIL import Image

    root = os.path.join(ROOT, ".cache", f"bench-tiny-{images}")
    done = os.path.join(root, ".complete")
    if not os.path.exists(done):
        rng = np.random.default_rng(0)
        for i in range(images):
            d = os.path.join(root, f"n{i % 10:08d}")
            os.makedirs(d, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(os.path.join(d, f"{i:06d}.png"))
        open(done, "w").close()
    return root


def measure(data: str, a, crop: int, resize: int):
    from engine.config import resolve_config
    from engine.evaluate import run_eval
    from engine.scoring.job import ScoreOptions
    from engine.scoring.run import run_score

    precision = a.precision or ("fp32" if a.backend in ("cpu", "sim") else "fp16")
    cfg = resolve_config(a.model, {"resize": resize, "crop": crop}, data=data, backend=a.backend,
                         batch_size=a.batch_size, workers=a.workers, sim_batch_ms=a.sim_batch_ms, progress=False,
                         compute_only_iters=1, precision=precision)
    evals, scores, writer = [], [], []
    for r in range(a.rounds):
        report, _ = run_eval(cfg, out=io.StringIO())
        evals.append(report["throughput"]["end_to_end"])
        out = tempfile.mkdtemp(prefix="bench-score-")
        try:
            summary, status = run_score(cfg, ScoreOptions(out=out, topk=a.topk, fmt=a.format,
                                                          part_size=a.part_size), out=io.StringIO())
            assert status == 0, f"run-score exited {status}"
            scores.append(summary["img_per_s"])
            writer.append(summary["writer_s"] / summary["score_wall_s"])
        finally:
            shutil.rmtree(out, ignore_errors=True)
        print(f"    round {r + 1}: run-eval {evals[-1]:8.1f} img/s   run-score {scores[-1]:8.1f} img/s"
              f"   writer thread busy {100 * writer[-1]:.1f}% of the time", flush=True)
    e, s = statistics.median(evals), statistics.median(scores)
    return {"eval_img_s": e, "score_img_s": s, "ratio": s / e, "writer_busy": statistics.median(writer),
            "evals": evals, "scores": scores}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--images", type=int, default=600, help="photos case (default: %(default)s)")
    p.add_argument("--tiny-images", type=int, default=4000, help="tiny case (default: %(default)s)")
    p.add_argument("--backend", default="sim")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--precision", default=None, help="default: fp32 on cpu/sim, fp16 on accelerators")
    p.add_argument("--sim-batch-ms", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--part-size", type=int, default=500)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--format", default="parquet", choices=("parquet", "jsonl", "csv"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cases", default="photos,tiny")
    a = p.parse_args(argv)
    results = {}
    for case in a.cases.split(","):
        if case == "photos":
            data, crop, resize = bench_data(a.images), 224, 256
        elif case == "tiny":
            data, crop, resize = tiny_data(a.tiny_images), 16, 16
        else:
            p.error(f"unknown case {case!r}")
        print(f"{case}: {a.backend} backend, batch {a.batch_size}, {a.workers} workers, parts of {a.part_size},"
              f" {a.format}, top-{a.topk}")
        results[case] = r = measure(data, a, crop, resize)
        print(f"  run-eval   {r['eval_img_s']:8.1f} img/s (median)")
        print(f"  run-score  {r['score_img_s']:8.1f} img/s (median)")
        print(f"  ratio      {r['ratio']:8.3f}  (run-score / run-eval, target >= 0.95)")
    result_block("score", backend=a.backend, workers=a.workers, batch=a.batch_size, part_size=a.part_size,
                 format=a.format, topk=a.topk, **{f"{k}_{m}": v for k, r in results.items() for m, v in r.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The reduce step's cost with the statistics (engine/report/analysis.py) against without.

run-eval reduces each finished batch on the event loop's thread: `Metrics.update` (integer
top-1/top-5 counts) is the baseline; the statistics add a log-softmax, top-5, ECE bins and
confusion counts per batch (and, with --per-image, the rows; with --real-labels, ReaL). Both are
timed here on the same random logits, in alternation, as medians of rounds; the figure is the
microseconds per image of each and their ratio, and what that costs at a given device rate.

    python bench/bench_stats.py [--batch 256] [--classes 1000] [--batches 40] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from _common import result_block


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()

    from engine.pipeline.dataset import Dataset
    from engine.report.analysis import Analysis
    from engine.report.metrics import Metrics

    n = a.batch * a.batches
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(a.batches, a.batch, a.classes)).astype(np.float32)
    labels = rng.integers(0, a.classes, (a.batches, a.batch))
    paths = tuple(f"n{i:08d}/ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(n))
    ds = Dataset(root="/nonexistent", paths=paths, labels=labels.reshape(-1), class_names=tuple(map(str, range(a.classes))),
                 layout="flat")

    def baseline() -> float:
        m = Metrics(a.classes)
        t = time.perf_counter()
        for b in range(a.batches):
            m.update(logits[b], labels[b])
        return time.perf_counter() - t

    def with_stats(per_image: bool) -> float:
        m = Metrics(a.classes)
        an = Analysis(ds, a.classes, "imagenet", None, "", "auto", None, per_image)
        t = time.perf_counter()
        for b in range(a.batches):
            lg = an.restrict(logits[b])
            m.update(lg, labels[b])
            an.update(lg, labels[b], np.arange(b * a.batch, (b + 1) * a.batch))
        return time.perf_counter() - t

    base, stats, rows = [], [], []
    for _ in range(a.rounds):
        base.append(baseline())
        stats.append(with_stats(False))
        rows.append(with_stats(True))
    us = {k: 1e6 * statistics.median(v) / n for k, v in (("counts", base), ("statistics", stats),
                                                          ("statistics_per_image", rows))}
    print(f"reduce, batch {a.batch} x {a.classes} classes, {n:,} images, median of {a.rounds} rounds:")
    print(f"  counts only (baseline)       {us['counts']:7.2f} us/image")
    print(f"  counts + statistics          {us['statistics']:7.2f} us/image  ({us['statistics'] / us['counts']:.2f}x)")
    print(f"  counts + statistics + rows   {us['statistics_per_image']:7.2f} us/image  "
          f"({us['statistics_per_image'] / us['counts']:.2f}x)")
    print(f"  at 20,000 img/s: counts {2e4 * us['counts'] / 1e6:.0%} of the reducing thread, counts + statistics "
          f"{2e4 * us['statistics'] / 1e6:.0%}")
    result_block("stats_reduce", batch=a.batch, classes=a.classes, images=n, us_per_image=us,
                 ratio_statistics=us["statistics"] / us["counts"],
                 ratio_statistics_per_image=us["statistics_per_image"] / us["counts"])


if __name__ == "__main__":
    main()

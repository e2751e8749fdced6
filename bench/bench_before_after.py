#!/usr/bin/env python3
"""Before and after a reshaping: the pool, the pixel cache and the overlap, each measured on two
checkouts of the project in one run, their rounds interleaved (before, after, before, after ...).

    git worktree add /tmp/before c102c4c     # the commit to compare against
    .venv/bin/python bench/bench_before_after.py --before /tmp/before

Each measurement runs in a fresh process of its checkout's own code (`bench/_common.py` of that
tree: the same helpers both sides), on the same images and cache, with this venv's Python:
  pool      the exact decode pool feeding a sim device at 0 ms (decode is all there is), img/s
  cache     warm reads of the pixel cache into a sim device at 0 ms, five runs in a row, img/s (built first
            by each tree: if the two keys differ, the before tree writes entries of its own)
  overlap   a sim device slower than the decode pool: end to end / compute-only
Target (the codebase issue): after / before >= 0.97 for each, medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from _common import ROOT, bench_data, machine, result_block

PROBE = r"""
import json, os, sys, time
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
sys.path.insert(0, os.getcwd())
from _common import run_cached, run_pool
what, data, cache = sys.argv[1], sys.argv[2], sys.argv[3]
if what == "build":
    run_cached(data, cache, 2, 64, write=True)
    print(json.dumps(0.0))
elif what == "pool":
    n, s, _, _ = run_pool(data, 2, 64)
    print(json.dumps(n / s))
elif what == "cache":  # a warm read is short: five in a row, so start-up noise does not decide it
    total_n = total_s = 0.0
    for _ in range(5):
        n, s, _, _, _ = run_cached(data, cache, 2, 256, write=False)
        total_n, total_s = total_n + n, total_s + s
    print(json.dumps(total_n / total_s))
else:
    n, s, _, c = run_pool(data, 2, 32, sim_batch_ms=float(sys.argv[4]))
    print(json.dumps((n / s) / c))
"""


def measure(tree: str, what: str, data: str, cache: str, sim_ms: float) -> float:
    env = dict(os.environ, PYTHONPATH=tree)
    r = subprocess.run([sys.executable, "-c", PROBE, what, data, cache, str(sim_ms)], cwd=tree, env=env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"{what} in {tree} failed:\n{r.stderr[-2000:]}")
    return float(json.loads(r.stdout.strip().splitlines()[-1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--before", required=True, metavar="DIR", help="a checkout of the commit to compare against")
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--overlap-sim-ms", type=float, default=0.0,
                   help="the overlap run's device time per batch of 32 (default: 1.6x the pool's decode time)")
    a = p.parse_args(argv)
    before = os.path.abspath(a.before)
    data = bench_data(a.images, classes=20)
    cache = os.path.join(ROOT, ".cache", f"bench-before-after-cache-{a.images}")
    measure(ROOT, "build", data, cache, 0.0)  # the cache, written by the after tree
    measure(before, "build", data, cache, 0.0)  # nothing to write when the before tree's key is the same
    print(f"bench_before_after: {a.images:,} images, {a.rounds} rounds, {machine()}; before = {before}", flush=True)
    sim_ms = a.overlap_sim_ms
    if not sim_ms:
        pool = measure(ROOT, "pool", data, cache, 0.0)
        sim_ms = 1.6 * 32 / pool * 1000.0  # a device 1/1.6 of the pool's rate: device-bound
    figures = {}
    for what in ("pool", "cache", "overlap"):
        b, f = [], []
        for _ in range(a.rounds):
            b.append(measure(before, what, data, cache, sim_ms))
            f.append(measure(ROOT, what, data, cache, sim_ms))
        mb, mf = statistics.median(b), statistics.median(f)
        figures[what] = {"before": mb, "after": mf, "ratio": mf / mb, "rounds_before": b, "rounds_after": f}
        unit = "e2e/compute" if what == "overlap" else "img/s"
        print(f"  {what:<8} before {mb:>10,.3f} {unit}  after {mf:>10,.3f}  after/before {mf / mb:.3f} "
              f"(target >= 0.97)", flush=True)
    result_block("before_after", images=a.images, sim_ms=sim_ms, figures=figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

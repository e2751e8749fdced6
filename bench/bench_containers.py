#!/usr/bin/env python3
"""Decode-pool throughput on the same images as loose files, WebDataset shards and Parquet shards.

Same images, workers and batch size, in one run: the pool with the sim backend at 0 ms/batch
(so decode and reading are all that is left) over
  - the folder (ImageFolder, one file per image: the baseline),
  - WebDataset shards of `--shard-size` images (each worker preads members of open tars),
  - Parquet shards in the Hugging Face layout, row groups of 100 (each worker reads a row
    group's image column once and takes its chunk's rows from it).
Timed from the first batch (worker start-up and the first reads excluded), rounds interleaved
(folder, wds, parquet, folder, ...) so drift on a shared machine hits all three alike, best of
`--repeat`. Every file is read once before timing (page cache warm for all). Prints img/s and
the ratios to the folder; the target is >= 0.95 for each. Beside it, the workers' CPU time per
image past start-up (getrusage of the reaped workers: a full run minus a run of the first two
batches, over the images between): on a machine shared with other work the wall-clock rates move
with the load, the CPU cost per image much less.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys

from _common import ROOT, bench_data, result_block, run_pool


def containers(folder: str, shard_size: int):
    """WebDataset and Parquet copies of `folder` beside it (made once)."""
    from engine.pipeline.containers.write import convert

    out = {}
    for kind in ("wds", "parquet"):
        where = os.path.join(ROOT, ".cache", f"{os.path.basename(folder)}-{kind}-{shard_size}-v2")
        done = os.path.join(where, ".complete")
        if not os.path.exists(done):
            convert(folder, where, kind, shard_size)
            open(done, "w").close()
        out[kind] = where
    return out


def warm(data: str) -> None:
    """Read every file of a layout once (the page cache), so no layout pays the disk for another."""
    for dirpath, _, names in os.walk(data):
        for n in names:
            with open(os.path.join(dirpath, n), "rb") as f:
                while f.read(1 << 22):
                    pass


def from_first_batch(stats) -> float:
    """img/s from the first filled batch to the last reduced one."""
    batches = sorted(stats.batches, key=lambda b: b.batch_no)
    t0 = batches[0].fill_done
    t1 = max(b.reduced for b in batches)
    return sum(b.images for b in batches[1:]) / (t1 - t0)


def workers_cpu(run):
    """(CPU seconds of the worker processes `run` started and reaped, its result)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, reaped by pool.close()
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=500, help="images per WebDataset / Parquet shard")
    p.add_argument("--repeat", type=int, default=3, help="best of N for each layout")
    a = p.parse_args(argv)
    folder = bench_data(a.images)
    layouts = {"folder": folder, **containers(folder, a.shard_size)}
    for data in layouts.values():
        warm(data)
    rates = {k: [] for k in layouts}
    cpu = {k: [] for k in layouts}
    small = 2 * a.batch_size
    for _ in range(a.repeat):
        for name, data in layouts.items():
            full_cpu = workers_cpu(lambda data=data: run_pool(data, a.workers, a.batch_size))
            n, secs, stats, _ = full_cpu[1]
            assert n == a.images, (name, n)
            rates[name].append(from_first_batch(stats))
            start_cpu = workers_cpu(lambda data=data: run_pool(data, a.workers, a.batch_size, limit=small))
            # the workers' CPU per image past start-up: (all images - the first `small`) / the difference
            cpu[name].append(1e3 * (full_cpu[0] - start_cpu[0]) / (n - small))
    best = {k: max(v) for k, v in rates.items()}
    least = {k: min(v) for k, v in cpu.items()}
    load = os.getloadavg()
    print(f"images {a.images}, workers {a.workers}, batch {a.batch_size}, shards of {a.shard_size}, best of "
          f"{a.repeat}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    for name in layouts:
        runs = " ".join(f"{r:.1f}" for r in rates[name])
        print(f"  {name:<8} {best[name]:8.1f} img/s   ratio to folder {best[name] / best['folder']:5.3f}   "
              f"(runs: {runs});  worker CPU {least[name]:.2f} ms/img, folder/this {least['folder'] / least[name]:5.3f}")
    result_block("containers", images=a.images, workers=a.workers, batch=a.batch_size, shard_size=a.shard_size,
                 folder=best["folder"], wds=best["wds"], parquet=best["parquet"],
                 ratio_wds=best["wds"] / best["folder"], ratio_parquet=best["parquet"] / best["folder"],
                 runs=rates, load=load, cpu_ms_per_image=least,
                 cpu_ratio_wds=least["folder"] / least["wds"], cpu_ratio_parquet=least["folder"] / least["parquet"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

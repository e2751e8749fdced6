#!/usr/bin/env python3
"""Soak: score 50,000 images through `run-eval` and watch memory and file descriptors stay flat.

The data is a flat folder of N symlinks (`ILSVRC2012_val_%08d.JPEG`, plus `val_label.txt`) to a
few hundred synthetic ImageNet-like JPEGs, so no 50,000 files need generating; every image is
still opened, decoded, resized and scored. The run is the real command line (sim backend, so no
model cost), in a subprocess; this script samples it from /proc once a second:

- resident memory (VmRSS) of the parent and of each worker, with the private part (RssAnon)
  apart from the shared ring pages (RssShmem), at the start (after warm-up: 10 % of the images),
  the middle (50 %) and the end (the last sample before the last batch is scored);
- open file descriptors of the parent and the workers;
- worker pids (a replaced worker would show as a new pid).

Pass: growth from start to end under 5 % for the parent's and the workers' RSS, and no growth in
open descriptors. Exit status 1 otherwise. The last line is a machine-readable `RESULT {...}`.

    .venv/bin/python bench/soak.py                 # 50,000 images, 2 workers
    .venv/bin/python bench/soak.py --images 5000   # a quick look
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time

from _common import ROOT, bench_data, result_block

from engine.procs import worker_processes  # noqa: E402  (_common puts the repo on sys.path)

EVAL = os.path.join(ROOT, "bin", "run-eval")


def soak_data(images: int, unique: int) -> str:
    """.cache/soak-N-U: N symlinks to U synthetic images, with val_label.txt (made once)."""
    from engine.pipeline.dataset import build_dataset

    root = os.path.join(ROOT, ".cache", f"soak-{images}-{unique}")
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    src = build_dataset(bench_data(unique, classes=20))
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "val_label.txt"), "w") as labels:
        for i in range(images):
            j = i % len(src)
            name = "ILSVRC2012_val_%08d.JPEG" % (i + 1)
            link = os.path.join(root, name)
            if not os.path.lexists(link):
                os.symlink(src.abspath(j), link)
            labels.write(f"{name} {int(src.labels[j])}\n")
    open(done, "w").close()
    return root


def _status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def _workers(parent: int):
    return sorted(w for w, p in worker_processes().items() if p == parent)


class Sampler(threading.Thread):
    """Samples the run's parent and workers every `period` seconds."""

    def __init__(self, pid: int, period: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples = []  # (t, parent status, {worker pid: status})
        self.worker_pids = set()
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                parent = _status(self.pid)
                workers = {}
                for w in _workers(self.pid):
                    try:
                        workers[w] = _status(w)
                    except OSError:
                        pass
            except OSError:
                return  # the run has ended
            if workers:
                self.worker_pids.update(workers)
                self.samples.append((time.monotonic(), parent, workers))
            self.stop.wait(self.period)


def _images_at(progress, t):
    """Images scored at time t, interpolated between progress lines."""
    before = [(pt, n) for pt, n in progress if pt <= t]
    after = [(pt, n) for pt, n in progress if pt > t]
    if not before:
        return 0
    if not after:
        return before[-1][1]
    (t0, n0), (t1, n1) = before[-1], after[0]
    return n0 + (n1 - n0) * (t - t0) / (t1 - t0)


def _mib(b: float) -> str:
    return f"{b / 2**20:8.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--unique", type=int, default=300, help="distinct synthetic JPEGs behind the links")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sim-batch-ms", type=float, default=1.0)
    p.add_argument("--max-growth", type=float, default=0.05, help="allowed RSS growth after warm-up")
    a = p.parse_args(argv)

    data = soak_data(a.images, a.unique)
    cmd = [sys.executable, EVAL, "--data", data, "--backend", "sim", "--sim-batch-ms", str(a.sim_batch_ms),
           "--batch-size", str(a.batch_size), "--workers", str(a.workers), "--compute-only-iters", "2"]
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    sampler = Sampler(proc.pid)
    sampler.start()
    progress = [(t0, 0)]
    for line in proc.stderr:
        m = re.match(r"scored ([\d,]+)/", line)
        if m:
            progress.append((time.monotonic(), int(m.group(1).replace(",", ""))))
        elif line.strip():
            sys.stderr.write(line)
    stdout = proc.stdout.read()
    rc = proc.wait()
    sampler.stop.set()
    sampler.join()
    wall = time.monotonic() - t0
    if rc != 0 or len(sampler.samples) < 3:
        print(stdout)
        print(f"soak: run-eval exited with {rc} after {wall:.0f} s ({len(sampler.samples)} samples)", file=sys.stderr)
        return 1
    scored = re.search(r"images\s+([\d,]+) scored", stdout)

    def pick(fraction):
        for s in sampler.samples:
            if _images_at(progress, s[0]) >= fraction * a.images:
                return s
        return sampler.samples[-1]

    # the end: the last sample before the final batch was scored (after it, the run shuts down)
    t_last = next((t for t, n in progress if n >= a.images), progress[-1][0])
    end = [s for s in sampler.samples if s[0] < t_last][-1:] or sampler.samples[-1:]
    points = [("start (10 %)", pick(0.10)), ("middle (50 %)", pick(0.50)), ("end", end[0])]
    print(f"soak: {a.images:,} images ({a.unique} distinct files behind symlinks), {a.workers} workers, "
          f"batch {a.batch_size}, sim backend; {wall:.0f} s, {a.images / wall:,.0f} img/s")
    print(f"{'':14} {'images':>8} {'parent RSS':>11} {'anon':>8} {'shm':>8} {'fds':>4} | "
          f"{'workers RSS':>11} {'anon':>8} {'shm':>8} {'fds':>4}  MiB")
    rows = []
    for name, (t, parent, workers) in points:
        w_rss = sum(s["VmRSS"] for s in workers.values())
        w_anon = sum(s["RssAnon"] for s in workers.values())
        w_shm = sum(s["RssShmem"] for s in workers.values())
        w_fds = sum(s["fds"] for s in workers.values())
        rows.append(dict(point=name, images=int(_images_at(progress, t)), parent_rss=parent["VmRSS"],
                         parent_anon=parent["RssAnon"], parent_shm=parent["RssShmem"], parent_fds=parent["fds"],
                         workers_rss=w_rss, workers_anon=w_anon, workers_shm=w_shm, workers_fds=w_fds,
                         workers=len(workers)))
        print(f"{name:14} {int(_images_at(progress, t)):8,} {_mib(parent['VmRSS']):>11} {_mib(parent['RssAnon'])} "
              f"{_mib(parent['RssShmem'])} {parent['fds']:4d} | {_mib(w_rss):>11} {_mib(w_anon)} {_mib(w_shm)} "
              f"{w_fds:4d}")
    start, end = rows[0], rows[-1]
    growth = {k: end[k] / start[k] - 1 for k in ("parent_rss", "workers_rss", "parent_anon", "workers_anon")}
    fds_grew = end["parent_fds"] > start["parent_fds"] or end["workers_fds"] > start["workers_fds"]
    replaced = len(sampler.worker_pids) - a.workers
    ok = (growth["parent_rss"] < a.max_growth and growth["workers_rss"] < a.max_growth and not fds_grew
          and replaced == 0 and scored is not None and int(scored.group(1).replace(",", "")) == a.images)
    print(f"growth start -> end: parent RSS {growth['parent_rss']:+.2%} (private {growth['parent_anon']:+.2%}), "
          f"workers RSS {growth['workers_rss']:+.2%} (private {growth['workers_anon']:+.2%}); "
          f"open fds {start['parent_fds']}+{start['workers_fds']} -> {end['parent_fds']}+{end['workers_fds']}; "
          f"workers replaced: {replaced}")
    print(f"{'PASS' if ok else 'FAIL'}: growth under {a.max_growth:.0%} after warm-up, no fd growth, "
          f"every image scored")
    result_block("soak", images=a.images, unique=a.unique, workers=a.workers, batch_size=a.batch_size,
                 seconds=round(wall, 1), points=rows, growth={k: round(v, 4) for k, v in growth.items()},
                 fds_grew=fds_grew, workers_replaced=replaced, passed=ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Pixel cache read rate: images per second delivered from the cache into a staging buffer.

Warm: the cache file is in the page cache; every batch goes through the real source
(CacheSource: checksums of every row checked, off the event loop) and the scheduler into a
backend that copies every byte into a preallocated staging buffer (what an H2D copy from pinned
staging reads). Baseline: the exact decode pool on the same images and cores, measured in the
same run. Targets: >= 20,000 img/s on the 2-core VM, and >= 30x the pool.

Cold: the pixels file's pages are dropped (posix_fadvise DONTNEED after the writer's fdatasync)
and read once through the same path; baseline: a dd-like sequential read of a file of the same
size on the same disk, its pages dropped the same way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time

import numpy as np

from _common import ROOT, bench_data, result_block, run_cached, run_pool, warm_files


def staging_backend(batch: int, inflight: int):
    """A backend whose copy is np.copyto into one of `inflight + 1` preallocated staging buffers."""
    from engine.backends.base import Backend, InFlight
    from engine.config import resolve_config

    cfg = resolve_config("resnext50_32x4d", backend="sim", batch_size=batch)

    class _Done(InFlight):
        def __init__(self, logits):
            self.logits = logits

        def result(self):
            return self.logits

    class Staging(Backend):
        name = "staging"

        def __init__(self):
            super().__init__(cfg)
            self.buffers = [np.zeros((batch,) + cfg.preprocess.shape, np.uint8) for _ in range(inflight + 1)]
            self.logits = np.zeros((batch, 1000), np.float32)
            self.bytes = 0
            self._next = 0
            self._lock = threading.Lock()

        def prepare(self, batch_size: int) -> None:
            pass

        def submit(self, pixels):
            with self._lock:
                buf = self.buffers[self._next]
                self._next = (self._next + 1) % len(self.buffers)
                self.bytes += pixels.nbytes
            np.copyto(buf[:len(pixels)], pixels)  # every byte read
            return _Done(self.logits[:len(pixels)])

    return Staging()


def drop_pages(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd) if hasattr(os, "fdatasync") else None
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sequential_read(path: str, chunk: int = 8 << 20) -> float:
    """Seconds to read `path` start to end in `chunk` reads (dd bs=8M), its pages dropped first."""
    drop_pages(path)
    buf = bytearray(chunk)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.perf_counter()
        while os.readv(fd, [view]) > 0:
            pass
        return time.perf_counter() - t
    finally:
        os.close(fd)


def main(argv=None) -> int:
    from engine.procs import usable_cores

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--images", type=int, default=20000,
                   help="synthetic set size (default: bench_overlap --pixel-cache's set, made once)")
    p.add_argument("--limit", type=int, default=4000, help="images of the set to use, 0 for all (default: %(default)s)")
    p.add_argument("--data", help="an image folder instead of the synthetic set")
    p.add_argument("--workers", type=int, default=usable_cores(), help="decode workers (default: every core)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--inflight", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="warm reads for at least this long")
    p.add_argument("--cache-dir", help="(default: .cache/bench-pixel-cache, emptied first)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold read (it writes a same-size file)")
    a = p.parse_args(argv)
    data = a.data or bench_data(a.images)
    cache_dir = a.cache_dir or os.path.join(ROOT, ".cache", "bench-pixel-cache")
    shutil.rmtree(cache_dir, ignore_errors=True)

    # baseline: the exact decode pool, same images and cores (nothing else to do: no device time)
    warm_files(data, a.limit or None)
    n, _, stats, _ = run_pool(data, a.workers, a.batch_size, inflight=a.inflight, limit=a.limit or None)
    pool_rate = n / stats.wall_s
    print(f"decode pool       {pool_rate:10,.1f} img/s  ({n} images, {a.workers} workers, batch {a.batch_size})")

    # build the cache (write-through, no device time): its rate beside the pool's
    n, _, stats, _, built = run_cached(data, cache_dir, a.workers, a.batch_size, inflight=a.inflight,
                                       limit=a.limit or None)
    build_rate = n / stats.wall_s
    assert built["written"] + built["written_failed"] == n, built
    print(f"  building cache  {build_rate:10,.1f} img/s  (write-through, {build_rate / pool_rate:.2f} of the pool)")

    # warm: every batch from the cache, checksums checked, copied into staging
    backend = staging_backend(a.batch_size, a.inflight)
    images, wall, rounds = 0, 0.0, 0
    cpu = 0.0  # CPU time of every thread of this process in the pipelines: what reading costs, whatever the load
    while wall < a.seconds or rounds < 2:
        n, _, stats, _, st = run_cached(data, cache_dir, a.workers, a.batch_size, inflight=a.inflight,
                                        backend=backend, limit=a.limit or None)
        assert st["hits"] == n and st["decoded"] == 0 and not st["workers_started"], st
        images += n
        wall += stats.wall_s
        cpu += st["cpu_s"]
        rounds += 1
    warm = images / wall
    per_cpu = images / cpu
    row = int(np.prod(backend.buffers[0].shape[1:]))
    print(f"warm cache read   {warm:10,.1f} img/s  ({warm * row / 1e9:.2f} GB/s into staging, {rounds} rounds, "
          f"checksums on; target >= 20,000)")
    print(f"  per CPU-second  {per_cpu:10,.1f} img  (CPU time of all this process's threads; load: "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"  ratio to pool   {warm / pool_rate:10,.1f} x  (target >= 30)")

    cold = disk = None
    if not a.no_cold:
        pixels = os.path.join(built["dir"], "pixels")
        drop_pages(pixels)
        n, _, stats, _, st = run_cached(data, cache_dir, a.workers, a.batch_size, inflight=a.inflight,
                                        backend=backend, limit=a.limit or None)
        cold = n / stats.wall_s
        nbytes = n * row
        same = os.path.join(cache_dir, "same-size")
        with open(same, "wb") as f:
            block = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
            for _ in range(0, nbytes, len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        disk = os.path.getsize(same) / sequential_read(same) / 1e6
        os.unlink(same)
        print(f"cold cache read   {cold:10,.1f} img/s  ({cold * row / 1e6:,.0f} MB/s, page cache dropped)")
        print(f"  disk sequential {disk:10,.0f} MB/s  (dd-like 8 MiB reads of a same-size file); "
              f"ratio {cold * row / 1e6 / disk:.2f}")
    result_block("cache", images=n, workers=a.workers, batch=a.batch_size, pool_img_per_s=pool_rate,
                 build_img_per_s=build_rate, warm_img_per_s=warm, warm_ratio_to_pool=warm / pool_rate,
                 warm_gb_per_s=warm * row / 1e9, warm_img_per_cpu_s=per_cpu, load=os.getloadavg()[0],
                 cold_img_per_s=cold,
                 cold_mb_per_s=cold * row / 1e6 if cold else None, disk_seq_mb_per_s=disk,
                 cold_ratio_to_disk=(cold * row / 1e6 / disk) if cold and disk else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())

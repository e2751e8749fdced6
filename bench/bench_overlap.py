#!/usr/bin/env python3
"""Overlap: with a simulated device slower than decoding, end to end reaches compute-only.

The sim backend spends --sim-batch-ms per batch without using the CPU, so the device is the
bottleneck; a pipeline that overlaps decode, copy and compute delivers nearly the device's
compute-only rate end to end. Target: ratio >= 0.95. Also sweeps device speeds to show where
the run turns from device-bound to decode-bound.

`--pixel-cache`: a device at 5,000 img/s (batch 256, `--sim-batch-ms 51.2`) whose copy is a real
memory copy, on 20,000 images: the decoding run (the pool alone), the run that builds the cache
(write-through; target: >= 0.9 of the decoding run's rate) and the run that reads it (target: end
to end >= 0.95 of compute-only), each ratio beside the others.
"""

from __future__ import annotations

import argparse
import sys

import os
import shutil

from _common import ROOT, bench_data, result_block, run_cached, run_pool, warm_files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    # long enough that the pipeline's fill at the start (the device waits for the first batch) and
    # the partial last batch (a full batch of device time for fewer images) cost little
    p.add_argument("--images", type=int, default=None, help="(default: 1200; 20,000 with --pixel-cache)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None, help="(default: 32; 256 with --pixel-cache)")
    p.add_argument("--sim-batch-ms", type=float, default=0.0,
                   help="device time per batch (default: 1.5x the measured decode time of a batch)")
    p.add_argument("--sweep", action="store_true", help="also sweep device speeds")
    p.add_argument("--pixel-cache", action="store_true",
                   help="measure the pixel cache instead: decoding run, building run, cached run (see above)")
    p.add_argument("--cache-dir", help="with --pixel-cache (default: .cache/bench-overlap-pixels, emptied first)")
    a = p.parse_args(argv)
    if a.pixel_cache:
        return pixel_cache(a)
    a.images = a.images or 1200
    a.batch_size = a.batch_size or 32
    data = bench_data(a.images)
    n, secs, stats, _ = run_pool(data, a.workers, a.batch_size, limit=min(a.images, 200))
    decode_rate = n / secs
    ms = a.sim_batch_ms or 1.5 * 1000 * a.batch_size / decode_rate
    n, secs, stats, compute = run_pool(data, a.workers, a.batch_size, sim_batch_ms=ms)
    e2e = n / stats.wall_s
    print(f"decode alone {decode_rate:.1f} img/s with {a.workers} workers; device {ms:.1f} ms per batch of"
          f" {a.batch_size}")
    print(f"  compute only {compute:8.1f} img/s")
    print(f"  end to end   {e2e:8.1f} img/s")
    print(f"  ratio        {e2e / compute:8.3f}  (target >= 0.95)")
    rows = []
    if a.sweep:
        print("sweep: device ms/batch, compute-only img/s, end-to-end img/s, ratio")
        for factor in (4.0, 2.0, 1.5, 1.0, 0.75, 0.5, 0.25):
            m = factor * 1000 * a.batch_size / decode_rate
            n, secs, st, c = run_pool(data, a.workers, a.batch_size, sim_batch_ms=m)
            rows.append({"batch_ms": m, "compute_only": c, "end_to_end": n / st.wall_s})
            print(f"  {m:8.1f} {c:10.1f} {n / st.wall_s:10.1f} {n / st.wall_s / c:8.3f}")
    result_block("overlap", images=n, workers=a.workers, batch=a.batch_size, batch_ms=ms, compute_only=compute,
                 end_to_end=e2e, ratio=e2e / compute, decode_rate=decode_rate, sweep=rows)
    return 0


def pixel_cache(a) -> int:
    images = a.images or 20000
    batch = a.batch_size or 256
    ms = a.sim_batch_ms or 1000.0 * batch / 5000.0  # a 5,000 img/s device
    data = bench_data(images)
    cache_dir = a.cache_dir or os.path.join(ROOT, ".cache", "bench-overlap-pixels")
    shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"{images:,} images, batch {batch}, device {ms:.1f} ms per batch ({1000 * batch / ms:,.0f} img/s), "
          f"{a.workers} workers, the sim copy a real memory copy")
    warm_files(data)  # the decoding run and the building run both read the files from memory
    n, _, st, compute = run_pool(data, a.workers, batch, sim_batch_ms=ms)
    plain = n / st.wall_s
    print(f"  decoding run     {plain:9,.1f} img/s end to end, {plain / compute:.3f} of compute-only "
          f"({compute:,.1f} img/s)")
    n, _, st, compute_b, built = run_cached(data, cache_dir, a.workers, batch, sim_batch_ms=ms)
    build = n / st.wall_s
    assert built["written"] + built["written_failed"] == n, built
    print(f"  building run     {build:9,.1f} img/s end to end (write-through, {built['written']:,} stored): "
          f"{build / plain:.3f} of the decoding run (target >= 0.9)")
    n, _, st, compute_c, read = run_cached(data, cache_dir, a.workers, batch, sim_batch_ms=ms)
    cpu = read["cpu_s"]
    cached = n / st.wall_s
    assert read["hits"] == n and not read["workers_started"], read
    print(f"  cached run       {cached:9,.1f} img/s end to end, {cached / compute_c:.3f} of compute-only "
          f"({compute_c:,.1f} img/s) (target >= 0.95); the decoding run: {plain / compute:.3f}")
    print(f"  host CPU of the cached run: {cpu:.2f} s for {n:,} images ({n / cpu:,.0f} img per CPU-second: "
          f"checksums, the sim's copy and its logits); load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    result_block("overlap_pixel_cache", images=n, workers=a.workers, batch=batch, batch_ms=ms,
                 compute_only=compute_c, cached_end_to_end=cached, cached_ratio=cached / compute_c,
                 decoding_end_to_end=plain, decoding_ratio=plain / compute, building_end_to_end=build,
                 build_cost_ratio=build / plain, cache_bytes=built.get("bytes"), cached_img_per_cpu_s=n / cpu,
                 load=os.getloadavg()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())

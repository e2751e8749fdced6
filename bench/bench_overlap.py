#!/usr/bin/env python3
"""Overlap: with a simulated device slower than decoding, end to end reaches compute-only.

The sim backend spends --sim-batch-ms per batch without using the CPU, so the device is the
bottleneck; a pipeline that overlaps decode, copy and compute delivers nearly the device's
compute-only rate end to end. Target: ratio >= 0.95. Also sweeps device speeds to show where
the run turns from device-bound to decode-bound.
"""

from __future__ import annotations

import argparse
import sys

from _common import bench_data, result_block, run_pool


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # long enough that the pipeline's fill at the start (the device waits for the first batch) and
    # the partial last batch (a full batch of device time for fewer images) cost little
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sim-batch-ms", type=float, default=0.0,
                   help="device time per batch (default: 1.5x the measured decode time of a batch)")
    p.add_argument("--sweep", action="store_true", help="also sweep device speeds")
    a = p.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())

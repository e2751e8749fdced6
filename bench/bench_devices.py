#!/usr/bin/env python3
"""`--devices`: end to end against the concurrent summed compute-only, fed from a warm pixel cache.

Simulated devices (the sim backend, one device process each) at 5,000 img/s apiece
(`--sim-batch-ms 51.2 --batch-size 256`) and at 2,500 img/s apiece for four: the run's end-to-end
img/s over the sum of every device's compute-only measured at once (targets: >= 0.9 for 2 and for
4 devices). And one device through the device-process path against today's in-process path on the
same cache and sim (target: >= 0.97). Every figure is beside its baseline from the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil

from _common import ROOT, bench_data, machine, result_block, run_cached


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--images", type=int, default=10240, help="images in the synthetic set (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="repeats of each configuration; the median is kept")
    a = p.parse_args(argv)
    data = bench_data(a.images, classes=20)
    cache = os.path.join(ROOT, ".cache", f"bench-devices-cache-{a.images}")
    b = a.batch_size
    print(f"bench_devices: {a.images:,} images, batch {b}, {machine()}", flush=True)
    # build (or complete) the cache first: every measured run below reads it only
    run_cached(data, cache, workers=os.cpu_count() or 1, batch=64)

    def ratio(devices: str, sim_ms: float):
        vals = []
        for _ in range(a.rounds):
            n, seconds, _, compute, stats = run_cached(data, cache, workers=1, batch=b, sim_batch_ms=sim_ms,
                                                       write=False, devices=devices)
            assert stats["hits"] == n, stats
            vals.append((n / seconds / compute, n / seconds, compute))
        vals.sort()
        return vals[len(vals) // 2]

    rows = {}
    for label, devices, sim_ms in (("in-process, 1 device", "", 51.2), ("1 device process", "0", 51.2),
                                   ("2 device processes", "0,1", 51.2), ("4 device processes", "0-3", 102.4)):
        r, e2e, compute = ratio(devices, sim_ms)
        rows[label] = {"ratio": r, "end_to_end": e2e, "compute_only": compute}
        print(f"  {label:<22} end to end {e2e:>9,.0f} img/s  compute-only (all at once) {compute:>9,.0f} img/s  "
              f"ratio {r:.3f}", flush=True)
    same_path = rows["1 device process"]["end_to_end"] / rows["in-process, 1 device"]["end_to_end"]
    print(f"  one device: device-process path / in-process path = {same_path:.3f} (target >= 0.97)")
    print(f"  2 devices: {rows['2 device processes']['ratio']:.3f} of the summed compute-only (target >= 0.9); "
          f"4 devices: {rows['4 device processes']['ratio']:.3f} (target >= 0.9)")
    result_block("devices", images=a.images, batch=b, rows=rows, one_device_path_ratio=same_path)
    if os.environ.get("BENCH_KEEP_CACHE") != "1":
        shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

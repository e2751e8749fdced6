#!/usr/bin/env python3
"""End to end against compute-only across simulated device speeds: where the pipeline turns from
device-bound to decode-bound. Writes a plot (PNG) of the sweep.

First the pool's decode capacity D is measured (sim backend at 0 ms per batch: decoding is all
that is left). Then the sim device is set to take f x D img/s for each factor f, and each run
prints compute-only img/s (the device alone), end-to-end img/s, their ratio and the run's own
verdict (engine/report/profile.py). Below f = 1 the run should be device-bound (target: end to end
>= 0.97 of compute-only); above, decode-bound at about D. `--modes exact,fast` sweeps both
decode modes on the same images.
"""

from __future__ import annotations

import argparse
import os
import sys

from _common import ROOT, bench_data, result_block, run_pool

FACTORS = (0.25, 0.5, 0.75, 0.9, 1.1, 1.5, 2.0, 4.0)


def one_run(data, workers, batch, ms, mode, limit):
    from engine.procs import usable_cores
    from engine.report.profile import breakdown

    details: dict = {}
    n, _, stats, compute = run_pool(data, workers, batch, sim_batch_ms=ms, decode=mode, limit=limit, details=details)
    prof = breakdown(stats, details["worker_stats"], workers, compute or 0.0, n, mode, "sim", usable_cores())
    return {"batch_ms": ms, "compute_only": compute, "end_to_end": n / stats.wall_s,
            "ratio": (n / stats.wall_s) / compute if compute else None, "bound": prof["bound"],
            "verdict": prof["verdict"], "decode_capacity": prof["decode_capacity"]}


def plot(rows_by_mode, capacity, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    top = max(r["compute_only"] for rows in rows_by_mode.values() for r in rows)
    low = min(r["compute_only"] for rows in rows_by_mode.values() for r in rows)
    ax.plot([low, top], [low, top], "k:", lw=1, label="end to end = compute-only")
    for mode, rows in rows_by_mode.items():
        xs = [r["compute_only"] for r in rows]
        line, = ax.plot(xs, [r["end_to_end"] for r in rows], "o-", label=f"end to end, {mode} decode")
        ax.axhline(capacity[mode], color=line.get_color(), ls="--", lw=1,
                   label=f"decode capacity, {mode} ({capacity[mode]:,.0f} img/s)")
        bx.plot(xs, [r["ratio"] for r in rows], "o-", color=line.get_color(), label=f"{mode} decode")
        bx.axvline(capacity[mode], color=line.get_color(), ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("device speed: compute-only img/s (log)")
    ax.set_ylabel("end-to-end img/s (log)")
    ax.set_title("end to end against the device's speed")
    ax.legend(fontsize=8)
    bx.axhline(0.97, color="grey", ls=":", lw=1, label="0.97")
    bx.set_ylim(0, 1.05)
    bx.set_xscale("log")
    bx.set_xlabel("device speed: compute-only img/s (log)")
    bx.set_ylabel("end to end / compute-only")
    bx.set_title("device-bound left of the dashed line, decode-bound right")
    bx.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--modes", default="exact,fast", help="decode modes to sweep (default: %(default)s)")
    p.add_argument("--factors", default=",".join(map(str, FACTORS)),
                   help="device speeds as multiples of the measured decode capacity (default: %(default)s)")
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "sweep.png"), help="PNG path ('' for none)")
    a = p.parse_args(argv)
    data = bench_data(a.images)
    modes = [m for m in a.modes.split(",") if m]
    factors = [float(f) for f in a.factors.split(",")]
    from engine.procs import usable_cores

    capacity, rows_by_mode = {}, {}
    for mode in modes:
        best = 0.0
        for _ in range(2):  # decode capacity: sim at 0 ms, best of 2
            n, _, stats, _ = run_pool(data, a.workers, a.batch_size, decode=mode)
            best = max(best, n / stats.wall_s)
        capacity[mode] = best
        print(f"{mode} decode: {a.workers} workers deliver {best:,.1f} img/s with the device free "
              f"({a.images} images, batch {a.batch_size})")
        print(f"  {'factor':>6} {'ms/batch':>9} {'compute-only':>13} {'end to end':>11} {'ratio':>6}  verdict")
        rows = []
        for f in factors:
            ms = 1000.0 * a.batch_size / (f * best)
            r = one_run(data, a.workers, a.batch_size, ms, mode, None)
            r["factor"] = f
            rows.append(r)
            print(f"  {f:6.2f} {ms:9.2f} {r['compute_only']:13,.1f} {r['end_to_end']:11,.1f} {r['ratio']:6.3f}  "
                  f"{r['verdict'][:90]}")
        rows_by_mode[mode] = rows
        bound = [r["ratio"] for r in rows if r["factor"] <= 0.5]
        if bound:
            print(f"  device-bound (f <= 0.5): end to end / compute-only >= {min(bound):.3f} (target >= 0.97)")
    if a.plot:
        plot(rows_by_mode, capacity, a.plot, f"sim backend, {a.workers} workers, batch {a.batch_size}, "
                                             f"{a.images} synthetic ImageNet-like JPEGs, {usable_cores()} cores")
        print(f"plot: {a.plot}")
    result_block("sweep", images=a.images, workers=a.workers, batch=a.batch_size, decode_capacity=capacity,
                 sweep=rows_by_mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`run-bench`: compute-only latency and throughput per batch size, for every backend.

The replacement for `calculate_cost_static.py` / `calculate_cost_dynamic.py`: the input lives on
the device, every timed call ends with a device synchronisation (the backend's `compute_only`),
the first `--warmup` calls are dropped, and throughput is batch / mean latency. For
`--shape dynamic` one model is prepared for the largest batch size and every batch size runs on
it (the reference only ever ran batch 1). `--e2e DATA` adds, per batch size, the end-to-end
figure of a full `run-eval` on real images, so the two columns stand side by side.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Dict, List, Optional

import numpy as np

from engine.cli import (add_model_args, add_pipeline_args, add_pixel_cache_args, add_preprocess_args, config_from_args,
                        positive_int)
from engine.config import ConfigError, RunConfig
from engine.errors import EXIT_OK

DEFAULT_BATCH_SIZES = "1,4,8,16,32,64"


def parse_batch_sizes(text: str) -> List[int]:
    try:
        sizes = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--batch-sizes wants comma-separated whole numbers, like 1,4,8 (got {text!r})")
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--batch-sizes wants positive whole numbers, like 1,4,8 (got {text!r})")
    return sorted(set(sizes))


def latency_row(batch_size: int, latencies_s: List[float]) -> Dict:
    """One result row: latency mean/p50/p99 in ms and img/s = batch / mean latency."""
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    mean = float(ms.mean())
    return {"batch_size": batch_size, "img_per_s": batch_size * 1000.0 / mean if mean > 0 else 0.0,
            "latency_ms": {"mean": mean, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}}


def end_to_end(cfg: RunConfig, data: str, batch_size: int) -> Dict:
    """A full run-eval at this batch size (progress off, table discarded); its end-to-end figure."""
    from engine.evaluate import run_eval

    run_cfg = cfg.replace(data=data, batch_size=batch_size, progress=False, json_path=None,
                          compute_only_iters=2)  # compute-only is measured by the bench itself
    report, status = run_eval(run_cfg, out=io.StringIO())
    return {"end_to_end_img_per_s": report["throughput"]["end_to_end"], "images": report["images"],
            "failed": report["failed"], "status": status, "pixel_cache": report.get("pixel_cache")}


def run_bench(cfg: RunConfig, batch_sizes: List[int], warmup: int, iterations: int, e2e: Optional[str] = None,
              log=sys.stderr) -> Dict:
    """Measure every batch size (and end to end on `e2e`); returns `{"results": [...], "config": {...}}`."""
    from engine.backends import resolve_auto
    from engine.pipeline.session import create_backend
    from engine.report.output import environment

    if cfg.backend.name == "auto" and not cfg.backend.devices:  # --devices: a device process picks
        cfg = cfg.replace(backend=resolve_auto())
    compute_cfg = cfg
    if cfg.backend.name == "cpu" and not cfg.backend.threads:
        from engine.procs import usable_cores

        compute_cfg = cfg.replace(threads=usable_cores())  # compute only: no decode workers to leave room for
    largest = max(batch_sizes)
    backend = create_backend(compute_cfg.replace(batch_size=largest))  # --devices: the device processes
    results = []
    info: Dict = {}
    try:
        if cfg.backend.shape == "dynamic":
            backend.prepare(largest)  # one model for every batch size
        for b in batch_sizes:
            if cfg.backend.shape == "static":
                backend.prepare(b)
            row = latency_row(b, backend.compute_only(b, iterations, warmup))
            per_device = backend.devices_report(0.0)
            if per_device:  # --devices: all at once (the host's figure is their sum), then each alone
                backend.compute_only_alone(b, iterations)
                row["devices"] = [dict(latency_row(b, d.latencies), id=d.id, img_per_s_alone=d.compute_only_alone)
                                  for d in backend.devices if d.alive]
                row["img_per_s"] = sum(d["img_per_s"] for d in row["devices"])
                row["img_per_s_alone_sum"] = sum(d["img_per_s_alone"] or 0.0 for d in row["devices"])
            info = backend.describe()
            results.append(row)
            print(f"run-bench: batch {b}: {row['latency_ms']['mean']:.3f} ms, {row['img_per_s']:,.1f} img/s",
                  file=log, flush=True)
    finally:
        backend.close()
    for row in results if e2e else []:
        assert e2e is not None
        figure = end_to_end(cfg, e2e, row["batch_size"])
        row["end_to_end_img_per_s"] = figure["end_to_end_img_per_s"]
        row["ratio"] = figure["end_to_end_img_per_s"] / row["img_per_s"] if row["img_per_s"] else None
        pc = figure["pixel_cache"]
        cached = ""
        if pc is not None:  # --pixel-cache: the first batch size builds it, the others read it
            row["pixel_cache"] = {k: pc.get(k) for k in ("hits", "written", "rejected", "decoded")}
            cached = f", pixel cache: {pc.get('hits', 0):,} read, {pc.get('written', 0):,} written"
        print(f"run-bench: batch {row['batch_size']}: end to end {row['end_to_end_img_per_s']:,.1f} img/s "
              f"({figure['images']} images, {figure['failed']} failed{cached})", file=log, flush=True)
    config = dict(cfg.to_dict(), batch_sizes=batch_sizes, warmup=warmup, iterations=iterations, e2e=e2e,
                  compute_only_threads=compute_cfg.backend.threads, backend_info=info, environment=environment())
    return {"results": results, "config": config}


def format_table(bench: Dict) -> str:
    cfg = bench["config"]
    info = cfg.get("backend_info", {})
    head = (f"run-bench: {cfg['backend']['name']} ({info.get('device_name') or info.get('device', '?')}), "
            f"{info.get('model') or cfg['model']['name']}, {cfg['backend']['precision']}, {cfg['backend']['shape']} shape, "
            f"input {cfg['preprocess']['crop']}x{cfg['preprocess']['crop']}, "
            f"{cfg['iterations']} timed calls after {cfg['warmup']} warm-up "
            "(compute only: input on the device, each call synchronised)")
    e2e = any("end_to_end_img_per_s" in r for r in bench["results"])
    cols = ["batch", "mean ms", "p50 ms", "p99 ms", "img/s"] + (["e2e img/s", "e2e/compute"] if e2e else [])
    rows = []
    for r in bench["results"]:
        lat = r["latency_ms"]
        row = [str(r["batch_size"]), f"{lat['mean']:.3f}", f"{lat['p50']:.3f}", f"{lat['p99']:.3f}",
               f"{r['img_per_s']:,.1f}"]
        if e2e:
            ratio = r.get("ratio")
            row += [f"{r.get('end_to_end_img_per_s', 0.0):,.1f}", "-" if ratio is None else f"{ratio:.2f}"]
        rows.append(row)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda cells: " | ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [head, line(cols), "-+-".join("-" * w for w in widths)] + [line(row) for row in rows]
    if any(r.get("devices") for r in bench["results"]):
        out += ["", "per device (ais_bench's fields: latency of one call on that device while every device runs; "
                    "throughput = batch / mean latency; the host row is their sum)",
                "  batch  device    mean ms     p50 ms     p99 ms        img/s  alone img/s"]
        for r in bench["results"]:
            for d in r.get("devices", []):
                lat = d["latency_ms"]
                out.append(f"  {r['batch_size']:>5}  {d['id']:>6} {lat['mean']:>10.3f} {lat['p50']:>10.3f} "
                           f"{lat['p99']:>10.3f} {d['img_per_s']:>12,.1f} {d['img_per_s_alone'] or 0.0:>12,.1f}")
            out.append(f"  {r['batch_size']:>5}    host {'':>10} {'':>10} {'':>10} {r['img_per_s']:>12,.1f} "
                       f"{r['img_per_s_alone_sum']:>12,.1f}")
    if bench["results"]:
        best = max(bench["results"], key=lambda r: r["img_per_s"])
        out.append(f"best: batch {best['batch_size']}, {best['img_per_s']:,.1f} img/s compute only")
    return "\n".join(out)


def check_plotting() -> None:
    """Raise ConfigError now, before measuring, if --plot cannot work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--plot needs matplotlib (pip install matplotlib)")


def plot(bench: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = bench["config"]
    xs = [r["batch_size"] for r in bench["results"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(xs, [r["img_per_s"] for r in bench["results"]], "o-", label="compute only")
    if any("end_to_end_img_per_s" in r for r in bench["results"]):
        ax.plot(xs, [r.get("end_to_end_img_per_s", 0.0) for r in bench["results"]], "s--", label="end to end")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    name = cfg.get("backend_info", {}).get("model") or cfg["model"]["name"]
    ax.set_title(f"{name} on {cfg['backend']['name']} ({cfg['backend']['precision']}, {cfg['backend']['shape']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run-bench", allow_abbrev=False,
        description="Compute-only latency (mean, p50, p99) and img/s per batch size with the input on the "
                    "device and every call synchronised; --e2e adds the end-to-end figure of a full run-eval.")
    add_model_args(p)
    add_preprocess_args(p)
    g = p.add_argument_group("benchmark")
    g.add_argument("--batch-sizes", type=parse_batch_sizes, default=parse_batch_sizes(DEFAULT_BATCH_SIZES),
                   metavar="A,B,...", help=f"(default: {DEFAULT_BATCH_SIZES})")
    g.add_argument("--warmup", type=int, default=5, help="untimed calls first (default: %(default)s)")
    g.add_argument("--iterations", type=positive_int, default=100, help="timed calls (default: %(default)s)")
    g.add_argument("--json", metavar="PATH", help="write {\"results\": [...], \"config\": {...}}")
    g.add_argument("--plot", metavar="PNG", help="img/s against batch size (needs matplotlib)")
    e = p.add_argument_group("end to end (--e2e)")
    e.add_argument("--e2e", metavar="DATA", help="also run run-eval on this data at every batch size (an image "
                   "folder, a tar, WebDataset or Parquet shards: as run-eval's --data)")
    e.add_argument("--labels", metavar="FILE", help="for a flat --e2e folder: lines 'FILENAME INDEX'")
    e.add_argument("--limit", type=positive_int, help="only the first N images of --e2e")
    add_pipeline_args(p, title="pipeline of --e2e", exclude=("batch_size", "compute_only_iters", "progress"))
    add_pixel_cache_args(p)  # for --e2e: every batch size after the first reads the cache
    p.set_defaults(batch_size=1, compute_only_iters=0, no_progress=True)
    return p


def run_bench_main(argv: Optional[List[str]] = None) -> int:
    from engine.commands import main

    return main("run-bench", _run_bench_command, argv)


def _run_bench_command(argv: Optional[List[str]]) -> int:
    p = bench_parser()
    a = p.parse_args(argv)
    if a.warmup < 0:
        p.error("--warmup must not be negative")
    from engine.pipeline.containers import is_container_spec
    from engine.pipeline.dataset import DatasetError

    try:
        container = bool(a.e2e) and is_container_spec(a.e2e)  # a tar, shards, Parquet (containers/)
    except DatasetError as e:
        p.error(str(e))
    if a.e2e and not container and not os.path.isdir(a.e2e):
        p.error(f"--e2e {a.e2e}: no such folder (or tar, WebDataset or Parquet shards)")
    if a.plot:
        check_plotting()
    cfg = config_from_args(a, data=a.e2e, labels=a.labels, limit=a.limit)
    bench = run_bench(cfg, a.batch_sizes, a.warmup, a.iterations, a.e2e)
    print(format_table(bench))
    if a.json:
        from engine.report.output import write_json

        write_json(a.json, bench)
    if a.plot:
        plot(bench, a.plot)
    return EXIT_OK

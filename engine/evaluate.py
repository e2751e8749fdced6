"""`run-eval`: dataset -> ring + worker pool -> backend, with compute-only measured in the same run.

A driver over the Session (engine/pipeline/session.py), which owns the loop, backend, ring, pool,
source and signals. Exit statuses (engine/errors.py): 0 every image scored; 1 some images failed
(listed in the report); 2 bad options or paths; 3 the run could not go on (worker, backend or
shared-memory error); 4 a device process was lost (--devices; its batches were redone);
130/143 stopped by SIGINT/SIGTERM (a partial report is still written, labelled partial).
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from engine import __version__
from engine.config import RunConfig, named_preset
from engine.backends.base import AllDevicesLost
from engine.errors import EXIT_DEVICE_LOST, EXIT_ERROR, EXIT_FAILED_IMAGES, EXIT_OK, exit_for_signal
from engine.pipeline.dataset import Dataset, build_dataset
from engine.pipeline.pool import WorkerPool
from engine.pipeline.scheduler import BatchResult, PipelineStats
from engine.pipeline.session import Session, close_pixel_cache, measure_compute_only, open_pixel_cache  # noqa: F401
from engine.procs import usable_cores
from engine.models.provenance import format_preprocessing_check, preprocessing_check
from engine.report.analysis import Analysis
from engine.report.metrics import Metrics
from engine.report.output import Progress, environment, format_eval, write_json
from engine.report.profile import breakdown, with_device_decode, with_pixel_cache
from engine.report.trace import write_trace


def build_report(cfg: RunConfig, ds: Dataset, metrics: Metrics, backend_info: Dict, stats: PipelineStats,
                 compute_lat, pool: Optional[WorkerPool], loop: str, partial: bool,
                 tuning: Optional[Dict] = None) -> Dict:
    n_done = metrics.images + metrics.failed
    e2e = n_done / stats.wall_s if stats.wall_s > 0 else 0.0
    compute = cfg.pipeline.batch_size / float(np.mean(compute_lat)) if compute_lat else 0.0
    workers = pool.worker_stats() if pool is not None else []
    busy = sum(w["busy_s"] for w in workers)
    per_worker = (sum(w["images"] for w in workers) / busy) if busy > 0 else 0.0
    return {
        "model": backend_info.get("model", cfg.model.ts or cfg.model.name),  # the --ts file when one ran
        "top1": metrics.accuracy(1),
        "top5": metrics.accuracy(5),
        "correct_top1": metrics.correct[1],
        "correct_top5": metrics.correct[5],
        "images": metrics.images,
        "failed": metrics.failed,
        "dataset_images": len(ds),
        "partial": partial,
        "failures": [{"index": i, "path": p, "reason": r} for i, p, r in metrics.failures],
        "throughput": {
            "end_to_end": e2e,
            "compute_only": compute,
            "ratio": e2e / compute if compute else None,
            "compute_only_iterations": len(compute_lat or []),
            "compute_only_latency_ms": {
                "mean": 1000 * float(np.mean(compute_lat)) if compute_lat else None,
                "p50": 1000 * float(np.percentile(compute_lat, 50)) if compute_lat else None,
                "p99": 1000 * float(np.percentile(compute_lat, 99)) if compute_lat else None,
            },
        },
        "stages": {
            "wall_s": stats.wall_s,
            "wait_s": stats.wait_s,
            "copy_s": stats.copy_s,
            "compute_s": stats.compute_s,
            "reduce_s": stats.reduce_s,
            "decode_s": stats.decode_s,
            "decode_img_per_s_per_worker": per_worker,
            "workers": workers,
            "worker_deaths": [{"worker": w, "how": h, "path": p} for w, h, p in (pool.deaths if pool else [])],
        },
        # stage partition of the wall time, decode vs device capacity, verdict (engine/report/profile.py)
        "profile": with_device_decode(
            breakdown(stats, workers, cfg.pipeline.workers, compute, n_done, cfg.preprocess.decode,
                      backend_info.get("backend", cfg.backend.name), usable_cores(),
                      devices=len(backend_info.get("devices") or ()) or 1),
            backend_info.get("device_decode")),
        "decode_mode": cfg.preprocess.decode,
        # --decode device: the GPU decoder as a stage (images, seconds, rate, routes, host share)
        "device_decode": backend_info.get("device_decode"),
        "decoder": _decoder(cfg.preprocess.decode),
        "autotune": tuning or {},  # --workers auto / --batch-size auto: choices and reasons
        "per_class": metrics.per_class(ds.class_names),
        "backend": backend_info,
        "loop": loop,
        "config": cfg.to_dict(),
        # how the preprocessing differs from the model's, and a --preset's origin (engine/config.py)
        "preprocessing_check": preprocessing_check(
            cfg.model.name, cfg.preprocess, named_preset(cfg.preset) if cfg.preset is not None else None,
            weights=cfg.model.weights, ts=cfg.model.ts, timm_size=cfg.model.timm_input_size),
        "version": __version__,
        "environment": environment(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def with_devices(report: Dict, devices: List[Dict], redone: int) -> None:
    """`--devices`: the per-device objects, and the host's totals beside them. `compute_only` stays
    the concurrent sum (every device measured at once, the honest figure); the sum of each device
    measured alone is what ais_bench prints."""
    report["devices"] = devices
    th = report["throughput"]
    alone = [d["compute_only_alone"] for d in devices if d.get("compute_only_alone")]
    th["compute_only_alone_sum"] = sum(alone) if len(alone) == len(devices) else None
    th["devices"] = len(devices)
    th["redone_batches"] = redone
    report["devices_lost"] = [d for d in devices if d.get("lost")]


def format_devices(report: Dict) -> str:
    """The console lines of `--devices`: one per device, then the host's sums."""
    th = report["throughput"]
    fmt = lambda v: f"{v:,.1f}" if v else "-"  # noqa: E731
    lines = ["  devices       id   images  compute-only (all at once / alone)  end-to-end img/s"]
    for d in report["devices"]:
        lost = f"  LOST: {d['lost']}" if d.get("lost") else ""
        lines.append(f"                {d['id']:>3} {d['images']:>8,}  {fmt(d['compute_only']):>14} / "
                     f"{fmt(d['compute_only_alone']):<14}     {fmt(d['end_to_end'])}{lost}")
    lines.append(f"  host          compute-only {fmt(th['compute_only'])} img/s with all {th['devices']} at once "
                 f"(each alone, summed as ais_bench does: {fmt(th.get('compute_only_alone_sum'))}); "
                 f"end to end {fmt(th['end_to_end'])} img/s")
    if th.get("redone_batches"):
        lines.append(f"  redone        {th['redone_batches']} batch(es) decoded again after their device was lost; "
                     "each image counted once")
    return "\n".join(lines)


def format_pixel_cache(pc: Dict) -> str:
    """The console line of `--pixel-cache`."""
    workers = "workers started" if pc.get("workers_started") else "no workers started"
    line = (f"  pixel cache   {pc.get('hits', 0):,} read, {pc.get('written', 0):,} written, "
            f"{pc.get('rejected', 0):,} rejected, {pc.get('decoded', 0):,} decoded ({workers}); {pc.get('dir')}")
    if pc.get("write_error"):
        line += f"\n  pixel cache   stopped writing: {pc['write_error']}"
    elif not pc.get("writing", True):
        line += "\n  pixel cache   read only this run (another run holds the write lock, or no room)"
    return line


def run_eval(cfg: RunConfig, out=None, handle_signals: bool = True) -> Tuple[Dict, int]:
    """Run the evaluation; prints the table, writes `--json`; returns (report, exit status)."""
    out = out or sys.stdout
    ds = build_dataset(cfg.data.path, cfg.data.labels, cfg.data.limit, cfg.data.num_classes)
    ds, analysis = Analysis.open(cfg, ds)  # --class-map relabels; --class-subset, --real-labels, --per-image
    metrics = Metrics(cfg.data.num_classes)

    def reduce(r: BatchResult) -> None:
        for row, reason in r.failures:
            i = int(r.indices[row])
            metrics.fail(i, ds.paths[i], reason)
            analysis.fail(i, reason)
        if r.ok.any():
            logits = analysis.restrict(r.logits[r.ok])  # --class-subset: -inf outside the subset
            metrics.update(logits, r.labels[r.ok])
            analysis.update(logits, r.labels[r.ok], r.indices[r.ok])

    session = Session(cfg, ds, handle_signals=handle_signals)
    stats = PipelineStats()
    compute: List[float] = []
    lost: Optional[AllDevicesLost] = None
    t0 = time.monotonic()
    try:
        try:
            # a stop signal while loading or compiling the model: the Session closes what it built
            # and says so (with handle_signals; else Ctrl-C is a KeyboardInterrupt, caught here)
            session.open()
        except KeyboardInterrupt:
            session.stopped = signal.SIGINT
            print("\nSIGINT: stopped before the run started", file=sys.stderr)
        if session.stopped is None:
            cfg = session.cfg  # with the backend auto chose, and what autotune chose
            session.start()
            # compute-only first, while the workers are idle: inputs already on the device
            compute = session.compute_only(cfg.pipeline.compute_only_iters)
            progress = Progress(len(ds), cfg.pipeline.progress)
            try:
                session.run(0, len(ds), reduce, progress, stats=stats)
            except AllDevicesLost as e:  # --devices: what was counted is reported, marked partial
                lost = e
            progress.close()
    finally:
        session.close()
    if not stats.wall_s:
        stats.wall_s = time.monotonic() - t0
    stopped = session.stopped
    report = build_report(cfg, ds, metrics, session.describe(), stats, compute, session.pool,
                          session.loop_name, partial=stopped is not None or lost is not None, tuning=session.autotune)
    report.update(analysis.report(metrics, cfg))  # statistics, label_set, real, published
    if session.pixel_cache is not None:
        report["pixel_cache"] = session.pixel_cache
        with_pixel_cache(report["profile"], report["pixel_cache"])  # the verdict knows what fed the run
    devices = session.backend.devices_report(stats.wall_s) if session.backend is not None else None
    if devices:  # --devices
        with_devices(report, devices, stats.redone_batches)
    text = format_eval(report)
    if report.get("devices"):
        text += "\n" + format_devices(report)
    if session.pixel_cache is not None:
        text += "\n" + format_pixel_cache(report["pixel_cache"])
    print(text, file=out)
    report["published"] = report["preprocessing_check"].get("published")  # what the weights' makers measured
    for line in format_preprocessing_check(report["preprocessing_check"], cfg.model.name, report["top1"],
                                           report["top5"]):
        print(line, file=out)
    if cfg.output.json_path:
        write_json(cfg.output.json_path, report)
    if cfg.report.per_image:
        analysis.write_per_image(cfg, report)
    if cfg.output.trace_path:
        keep = ("throughput", "profile", "decode_mode", "autotune", "images", "failed", "backend")
        write_trace(cfg.output.trace_path, stats.batches, session.pool.spans if session.pool else [],
                    {k: report[k] for k in keep})
    if stopped is not None:
        return report, exit_for_signal(stopped)
    if lost is not None:
        print(f"run-eval: error: {lost}", file=sys.stderr)
        return report, EXIT_ERROR
    if metrics.failed:
        return report, EXIT_FAILED_IMAGES
    return report, EXIT_DEVICE_LOST if report["backend"].get("devices_lost") else EXIT_OK


def _decoder(mode: str) -> str:
    """What decodes JPEGs in `mode` (the workers load the same libraries as this process)."""
    from preprocess.decode import decoder

    if mode == "device":  # the backend's report names the device decoder (backend.jpeg_decoder)
        return "JPEGs the device decoder takes: on the device; the rest by the workers, exact: " + decoder("exact")
    return decoder(mode)

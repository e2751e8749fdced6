"""`run-eval`: dataset -> ring + worker pool -> backend, with compute-only measured in the same run.

Exit statuses: 0 every image scored; 1 some images failed (listed in the report); 2 bad options or
paths; 3 the run could not go on (worker, backend or shared-memory error); 130/143 stopped by
SIGINT/SIGTERM (a partial report is still written, labelled partial).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Dict, Optional, Tuple

import numpy as np

from engine import __version__
from engine.backends import create_backend
from engine.backends.base import Backend
from engine.config import RunConfig, format_preprocessing_check, preprocessing_check
from engine.pipeline.dataset import Dataset, build_dataset
from engine.pipeline.autotune import autotune
from engine.report.metrics import Metrics
from engine.pipeline.pool import WorkerPool
from engine.procs import usable_cores
from engine.report.profile import breakdown, with_device_decode, with_pixel_cache
from engine.report.output import Progress, environment, format_eval, write_json
from engine.pipeline.ring import Ring
from engine.pipeline.sources import CacheSource, Source
from engine.pipeline.encoded import check_backend, make_ring, make_source
from engine.pipeline.scheduler import BatchResult, PipelineStats, loop_name, new_event_loop, run_pipeline
from engine.report.trace import write_trace

EXIT_OK, EXIT_FAILED_IMAGES, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3


class Stopped(Exception):
    """The run was stopped by a signal; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def measure_compute_only(backend: Backend, batch_size: int, iterations: int = 0, budget_s: float = 2.0):
    """Latencies of the model alone on a resident batch; with iterations=0, about `budget_s` worth."""
    if iterations:
        return backend.compute_only(batch_size, iterations, warmup=2)
    # the probe is a second warm-up (allocators, autotuners settle over the first calls); at least
    # 3 timed calls even for a slow model, so one noisy call cannot make the figure
    probe = backend.compute_only(batch_size, 1, warmup=1)
    n = int(max(3, min(200, budget_s / max(probe[0], 1e-6))))
    return backend.compute_only(batch_size, n, warmup=0)


def _force_exit(signum: int, ring: Optional[Ring]) -> None:
    """A second SIGINT/SIGTERM: unlink the shared memory and leave now. Workers die with us
    (PR_SET_PDEATHSIG, and EOF on their sockets); no report is written."""
    if ring is not None:
        ring.close()
    print(f"\n{signal.Signals(signum).name} again: exiting at once, no report", file=sys.stderr)
    sys.stderr.flush()
    os._exit(128 + signum)


class StopSignals:
    """While the event loop runs. First SIGINT/SIGTERM: `on_stop()`, then cancel the run (partial
    report). Second: exit at once. `remove()` puts back the handlers that were there before.

    The first signal arrives through the loop. The second must not: while stopping, the loop
    thread may block (joining a device thread that finishes its batch), and a loop callback would
    wait for it. So the first one swaps in a plain `signal.signal` handler, which Python runs in
    the main thread even inside a blocking join.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task, ring: Optional[Ring],
                 on_stop=None):
        self.loop, self.task, self.ring, self.on_stop = loop, task, ring, on_stop
        self.signum: Optional[int] = None
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self._previous:
            loop.add_signal_handler(s, self._on_signal, s)

    def _on_signal(self, signum: int) -> None:
        if self.signum is not None:
            _force_exit(signum, self.ring)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping (again to force)", file=sys.stderr)
        for s in self._previous:
            self.loop.remove_signal_handler(s)
            signal.signal(s, self._force)
        if self.on_stop is not None:
            self.on_stop()
        self.task.cancel()

    def _force(self, signum: int, frame) -> None:
        _force_exit(signum, self.ring)

    def remove(self) -> None:
        """Back to the handlers from before; once stopping, the forcing handler stays to the end."""
        for s, previous in self._previous.items():
            self.loop.remove_signal_handler(s)
            if self.signum is not None:
                signal.signal(s, self._force)
            elif previous is not None:
                signal.signal(s, previous)


def run_stoppable(loop: asyncio.AbstractEventLoop, task: asyncio.Task, ring: Optional[Ring],
                  on_stop=None) -> Optional[int]:
    """Run `task` to its end under `StopSignals`; returns the signal that stopped it, else None.
    Errors other than that cancellation are raised."""
    signals = StopSignals(loop, task, ring, on_stop=on_stop)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        if signals.signum is None:
            raise
        return signals.signum
    finally:
        signals.remove()
    return None


def build_report(cfg: RunConfig, ds: Dataset, metrics: Metrics, backend_info: Dict, stats: PipelineStats,
                 compute_lat, pool: Optional[WorkerPool], loop: str, partial: bool,
                 tuning: Optional[Dict] = None) -> Dict:
    n_done = metrics.images + metrics.failed
    e2e = n_done / stats.wall_s if stats.wall_s > 0 else 0.0
    compute = cfg.batch_size / float(np.mean(compute_lat)) if compute_lat else 0.0
    workers = pool.worker_stats() if pool is not None else []
    busy = sum(w["busy_s"] for w in workers)
    per_worker = (sum(w["images"] for w in workers) / busy) if busy > 0 else 0.0
    return {
        "model": backend_info.get("model", cfg.ts or cfg.model),  # the --ts file when one ran
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
            breakdown(stats, workers, cfg.workers, compute, n_done, cfg.preprocess.decode,
                      backend_info.get("backend", cfg.backend), usable_cores()),
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
        "preprocessing_check": preprocessing_check(cfg.model, cfg.preprocess, cfg.preset, weights=cfg.weights,
                                                   ts=cfg.ts, timm_size=cfg.timm_input_size),
        "version": __version__,
        "environment": environment(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


async def _evaluate(cfg: RunConfig, ds: Dataset, backend: Backend, ring: Ring, metrics: Metrics, state: Dict):
    loop = asyncio.get_running_loop()
    pool = WorkerPool(ring, ds, cfg.preprocess, cfg.workers, image_timeout=cfg.image_timeout,
                      max_image_pixels=cfg.max_image_pixels)
    state["pool"] = pool
    pad = cfg.batch_size if backend.static_shape else 0
    cache = state.get("cache")
    if cache is None:
        source: Source = make_source(pool, ring, backend, cfg, pad)  # the decode pool, pixels or bytes
    else:  # the workers start only if something must be decoded (engine/pipeline/sources.py)
        source = state["source"] = CacheSource(cache, ds, pool, ring, pad, ahead=cfg.slots,
                                               write=state.get("cache_write", True))
    try:
        if cache is None:
            await pool.start()
        else:
            await source.start(0, len(ds))
        # compute-only first, while the workers are idle: inputs already on the device
        state["compute"] = await loop.run_in_executor(
            None, measure_compute_only, backend, cfg.batch_size, cfg.compute_only_iters)

        def reduce(r: BatchResult) -> None:
            for row, reason in r.failures:
                i = int(r.indices[row])
                metrics.fail(i, ds.paths[i], reason)
            if r.ok.any():
                metrics.update(r.logits[r.ok], r.labels[r.ok])

        progress = Progress(len(ds), cfg.progress)
        state["stats"] = PipelineStats()
        await run_pipeline(source, backend, len(ds), cfg.batch_size, cfg.inflight, reduce, progress,
                           stats=state["stats"])
        progress.close()
        await source.finish()
    finally:
        if isinstance(source, CacheSource):
            source.close()
        pool.close()


def open_pixel_cache(cfg: RunConfig, ds: Dataset, log=None):
    """The `--pixel-cache` of a run, or (None, False); else (cache, write). The cache opens
    read-only (`write` False, one line says why) when another run holds its write lock or the
    images it lacks do not fit on its disk: the run then reads what is there and decodes the rest."""
    if not cfg.pixel_cache:
        return None, False
    from engine.pipeline.pixelcache import PixelCache

    cache = PixelCache.open(cfg.pixel_cache, ds, cfg.preprocess, cfg.max_image_pixels, verify=cfg.cache_verify,
                            write=True)
    if cache.note:
        print(f"warning: {cache.note}", file=log if log is not None else sys.stderr)
    return cache, bool(cache.writable)


def close_pixel_cache(cache, log=None) -> None:
    """Close the cache (its last flush); a disk that fills up right then is a warning, not an error:
    the run's results stand and the cache stays resumable."""
    from engine.pipeline.pixelcache import PixelCacheError

    try:
        cache.close()
    except PixelCacheError as e:
        print(f"warning: pixel cache: {e}", file=log if log is not None else sys.stderr)


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


def run_eval(cfg: RunConfig, out=None) -> Tuple[Dict, int]:
    """Run the evaluation; prints the table, writes `--json`; returns (report, exit status)."""
    out = out or sys.stdout
    ds = build_dataset(cfg.data, cfg.labels, cfg.limit, cfg.num_classes)
    metrics = Metrics(cfg.num_classes)
    state: Dict = {"stats": None, "compute": None, "pool": None}
    ring = None
    backend = None
    state["cache"], state["cache_write"] = open_pixel_cache(cfg, ds)
    loop = new_event_loop()
    stopped: Optional[int] = None
    t0 = time.monotonic()
    try:
        backend = create_backend(cfg)
        check_backend(cfg, backend)  # --decode device: before the model loads
        cfg = cfg.replace(backend=backend.name)
        if cfg.workers == 0 or cfg.batch_size == 0:  # --workers auto, --batch-size auto
            auto_reason = backend.auto_reason
            cfg, backend, state["autotune"] = autotune(cfg, ds, backend)
            backend.auto_reason = auto_reason
        else:
            backend.prepare(cfg.batch_size)
        ring = make_ring(cfg)  # with a byte arena for --decode device
        backend.register_host_memory(ring.buffer())
        task = loop.create_task(_evaluate(cfg, ds, backend, ring, metrics, state))
        stopped = run_stoppable(loop, task, ring, on_stop=lambda: state["pool"] and state["pool"].stopping())
    except KeyboardInterrupt:
        # Ctrl-C before the event loop ran (loading the model): Python raises it once the native
        # call in progress returns. SIGTERM then keeps its default action: the process ends at
        # once, with nothing to clean up yet (no workers; a ring is unlinked by the resource tracker).
        stopped = signal.SIGINT
        print("\nSIGINT: stopped before the run started", file=sys.stderr)
    finally:
        loop.close()
        if state["cache"] is not None:
            source = state.get("source")
            state["pixel_cache"] = source.stats() if source is not None else dict(state["cache"].stats())
            close_pixel_cache(state["cache"])
        if backend is not None:
            backend.unregister_host_memory()
        if ring is not None:
            ring.close()
        if backend is not None:
            backend_info = backend.describe()  # before close(): it says what ran (graphs, host memory)
            if backend.auto_reason:
                backend_info["auto"] = backend.auto_reason
            backend.close()
        else:
            backend_info = {"backend": cfg.backend}
    stats = state["stats"] or PipelineStats(wall_s=time.monotonic() - t0)
    report = build_report(cfg, ds, metrics, backend_info, stats, state["compute"], state["pool"],
                          loop_name(loop), partial=stopped is not None, tuning=state.get("autotune"))
    if state.get("pixel_cache") is not None:
        report["pixel_cache"] = state["pixel_cache"]
        with_pixel_cache(report["profile"], report["pixel_cache"])  # the verdict knows what fed the run
    text = format_eval(report)
    if state.get("pixel_cache") is not None:
        text += "\n" + format_pixel_cache(report["pixel_cache"])
    print(text, file=out)
    report["published"] = report["preprocessing_check"].get("published")  # what the weights' makers measured
    for line in format_preprocessing_check(report["preprocessing_check"], cfg.model, report["top1"], report["top5"]):
        print(line, file=out)
    if cfg.json_path:
        write_json(cfg.json_path, report)
    if cfg.trace_path:
        keep = ("throughput", "profile", "decode_mode", "autotune", "images", "failed", "backend")
        write_trace(cfg.trace_path, stats.batches, state["pool"].spans if state["pool"] else [],
                    {k: report[k] for k in keep})
    if stopped is not None:
        return report, 128 + stopped
    return report, EXIT_FAILED_IMAGES if metrics.failed else EXIT_OK


def _decoder(mode: str) -> str:
    """What decodes JPEGs in `mode` (the workers load the same libraries as this process)."""
    from preprocess.decode import decoder

    if mode == "device":  # the backend's report names the device decoder (backend.jpeg_decoder)
        return "JPEGs the device decoder takes: on the device; the rest by the workers, exact: " + decoder("exact")
    return decoder(mode)

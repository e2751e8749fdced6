"""Shared helpers for the benchmarks: cached synthetic data, timing the pool, result blocks."""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def bench_data(images: int, classes: int = 20, seed: int = 7) -> str:
    """A synthetic ImageNet-like set in .cache/bench-data-N (made once)."""
    from engine.synthetic import make_dataset

    root = os.path.join(ROOT, ".cache", f"bench-data-{images}-{classes}-{seed}")
    done = os.path.join(root, ".complete")
    if not os.path.exists(done):
        make_dataset(root, images, classes, layout="folder", seed=seed)
        open(done, "w").close()
    return root


def run_pool(data: str, workers: int, batch: int, sim_batch_ms: float = 0.0, limit=None, decode="exact",
             inflight: int = 3, loop_kind: str = "auto", details=None, **fields):
    """Time the whole pipeline (worker start included) on the sim backend.

    Returns (images, seconds, PipelineStats, compute-only img/s). `details`, a dict if given,
    receives the pool's `worker_stats` and `spans` (the workers' own clocks).
    """
    from engine.backends.sim import SimBackend
    from engine.config import resolve_config
    from engine.pipeline.dataset import build_dataset
    from engine.evaluate import measure_compute_only
    from engine.pipeline.pool import WorkerPool
    from engine.pipeline.ring import Ring
    from engine.pipeline.scheduler import new_event_loop, run_pipeline
    from engine.pipeline.sources import PoolSource

    cfg = resolve_config("resnext50_32x4d", {"decode": decode}, backend="sim", batch_size=batch, workers=workers,
                         sim_batch_ms=sim_batch_ms, inflight=inflight, **fields)
    ds = build_dataset(data, limit=limit)
    backend = SimBackend(cfg)
    backend.prepare(batch)
    ring = Ring(cfg.slots, batch, cfg.preprocess.shape)
    out = {}

    async def main():
        t = time.perf_counter()
        pool = WorkerPool(ring, ds, cfg.preprocess, workers)
        await pool.start()
        try:
            lat = measure_compute_only(backend, batch, 5) if sim_batch_ms else None
            t = time.perf_counter() if lat else t
            stats = await run_pipeline(PoolSource(pool, ring), backend, len(ds), batch, inflight, lambda r: None)
        finally:
            pool.close()
        if details is not None:
            details.update(worker_stats=pool.worker_stats(), spans=list(pool.spans))
        out["seconds"] = time.perf_counter() - t
        out["stats"] = stats
        out["compute"] = batch / (sum(lat) / len(lat)) if lat else None

    loop = new_event_loop(loop_kind)
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        ring.close()
    return len(ds), out["seconds"], out["stats"], out["compute"]


def warm_files(data: str, limit=None) -> None:
    """Read every image file once, so that the first of two compared runs does not pay the disk
    reads the second one is spared (the page cache)."""
    from engine.pipeline.dataset import build_dataset

    ds = build_dataset(data, limit=limit)
    for i in range(len(ds)):
        try:
            with open(ds.abspath(i), "rb") as f:
                while f.read(1 << 20):
                    pass
        except OSError:
            pass


def run_cached(data: str, cache_dir: str, workers: int, batch: int, sim_batch_ms: float = 0.0, limit=None,
               decode="exact", inflight: int = 3, backend=None, write: bool = True, **fields):
    """Like `run_pool`, through the pixel cache (CacheSource: reads what it holds, decodes and stores
    the rest; workers start only if something must be decoded). `backend`: a prepared backend to use
    instead of the sim one. Returns (images, seconds, PipelineStats, compute-only img/s, cache stats);
    the cache stats' `cpu_s` is this process's CPU time (all threads) during the pipeline."""
    from engine.backends.sim import SimBackend
    from engine.config import resolve_config
    from engine.evaluate import measure_compute_only
    from engine.pipeline.dataset import build_dataset
    from engine.pipeline.pixelcache import PixelCache
    from engine.pipeline.pool import WorkerPool
    from engine.pipeline.ring import Ring
    from engine.pipeline.scheduler import new_event_loop, run_pipeline
    from engine.pipeline.sources import CacheSource

    cfg = resolve_config("resnext50_32x4d", {"decode": decode}, backend="sim", batch_size=batch, workers=workers,
                         sim_batch_ms=sim_batch_ms, inflight=inflight, **fields)
    ds = build_dataset(data, limit=limit)
    if backend is None:
        backend = SimBackend(cfg)
        backend.prepare(batch)
    ring = Ring(cfg.slots, batch, cfg.preprocess.shape)
    cache = PixelCache.open(cache_dir, ds, cfg.preprocess, None)
    out = {}

    async def main():
        pool = WorkerPool(ring, ds, cfg.preprocess, workers)
        source = CacheSource(cache, ds, pool, ring, 0, ahead=cfg.slots, write=write and cache.writable)
        try:
            await source.start(0, len(ds))
            lat = measure_compute_only(backend, batch, 5) if sim_batch_ms else None
            t, cpu = time.perf_counter(), time.process_time()
            stats = await run_pipeline(source, backend, len(ds), batch, inflight, lambda r: None)
            await source.finish()
            out["seconds"] = time.perf_counter() - t
            out["cpu_s"] = time.process_time() - cpu  # every thread of this process (not the workers)
        finally:
            source.close()
            pool.close()
        out["stats"] = stats
        out["compute"] = batch / (sum(lat) / len(lat)) if lat else None
        out["cache"] = dict(source.stats(), cpu_s=out["cpu_s"])

    loop = new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        ring.close()
        cache.close()
    return len(ds), out["seconds"], out["stats"], out["compute"], out["cache"]


def machine() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    except OSError:
        model = platform.processor()
    return f"{model}, {len(os.sched_getaffinity(0))} cores usable"


def result_block(name: str, **figures) -> None:
    """One machine-readable line: `RESULT {json}`."""
    print("RESULT " + json.dumps(dict(bench=name, machine=machine(), **figures), sort_keys=True))

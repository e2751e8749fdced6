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
    """Time the whole pipeline (worker start included) on the sim backend, through a Session.

    Returns (images, seconds, PipelineStats, compute-only img/s). `details`, a dict if given,
    receives the pool's `worker_stats` and `spans` (the workers' own clocks).
    """
    from engine.config import resolve_config
    from engine.pipeline.dataset import build_dataset
    from engine.pipeline.session import Session

    cfg = resolve_config("resnext50_32x4d", {"decode": decode}, backend="sim", batch_size=batch, workers=workers,
                         sim_batch_ms=sim_batch_ms, inflight=inflight, **fields)
    ds = build_dataset(data, limit=limit)
    with Session(cfg, ds, loop_kind=loop_kind) as s:
        t = time.perf_counter()
        s.start()
        lat = s.compute_only(5) if sim_batch_ms else None
        t = time.perf_counter() if lat else t
        stats = s.run(0, len(ds), lambda r: None)
        seconds = time.perf_counter() - t
        if details is not None:
            details.update(worker_stats=s.pool.worker_stats(), spans=list(s.pool.spans))
    compute = batch / (sum(lat) / len(lat)) if lat else None
    return len(ds), seconds, stats, compute


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
    from engine.config import resolve_config
    from engine.pipeline.dataset import build_dataset
    from engine.pipeline.session import Session

    cfg = resolve_config("resnext50_32x4d", {"decode": decode}, backend="sim", batch_size=batch, workers=workers,
                         sim_batch_ms=sim_batch_ms, inflight=inflight, pixel_cache=cache_dir, **fields)
    ds = build_dataset(data, limit=limit)
    s = Session(cfg, ds, backend=backend, cache_write=write).open()
    try:
        s.start()
        lat = s.compute_only(5) if sim_batch_ms else None
        t, cpu = time.perf_counter(), time.process_time()
        stats = s.run(0, len(ds), lambda r: None)
        seconds = time.perf_counter() - t
        cpu_s = time.process_time() - cpu  # every thread of this process (not the workers)
    finally:
        s.close()
    compute = batch / (sum(lat) / len(lat)) if lat else None
    return len(ds), seconds, stats, compute, dict(s.pixel_cache, cpu_s=cpu_s)


def machine() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        model = platform.processor()
    return f"{model}, {len(os.sched_getaffinity(0))} cores usable"


def result_block(name: str, **figures) -> None:
    """One machine-readable line: `RESULT {json}`."""
    print("RESULT " + json.dumps(dict(bench=name, machine=machine(), **figures), sort_keys=True))

"""`make-cache`: fill the pixel cache with no model and no device; optionally export it as `.bin` files.

    --data -> index -> PixelCache.open (key: files + preprocessing) -> the images it lacks
    -> CacheSource (write-through): the decode pool fills ring slots, each batch is stored
    -> flush (completion record) -> --export-bin: export_bin (ModelZoo layout)

Resumable: what an earlier (or interrupted) make-cache or run stored is kept and not decoded
again; run the same command to complete it. The batches it stores are the ones `run-eval
--pixel-cache` with the same data and preprocessing flags reads (docs/pixel-cache.md).

Exit statuses: 0 the cache holds every image (a failed image is stored with its reason, as
run-eval reports it); 2 bad options or paths; 3 the cache cannot be written (no room, another run
holds its write lock, a worker error); 130/143 stopped by SIGINT/SIGTERM (what was stored is kept).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from engine import __version__

EXIT_OK, EXIT_USAGE, EXIT_ERROR = 0, 2, 3
EXPORT_FORMATS = ("uint8-hwc", "float32-nchw")


def cache_parser() -> argparse.ArgumentParser:
    from engine.cli import add_data_args, add_pixel_cache_args, add_preprocess_args, non_negative_float, positive_int

    p = argparse.ArgumentParser(
        prog="make-cache", allow_abbrev=False,
        description="Fill the exact pixel cache (the uint8 crops run-eval --pixel-cache reads) with no model and "
                    "no device: decode every image the cache lacks, with a progress bar; resumable. "
                    "--export-bin also writes one raw .bin per image (the ModelZoo prep_dataset layout).")
    add_data_args(p)
    from engine.cli import add_model_source_args

    add_model_source_args(p.add_argument_group("model (whose declared preprocessing, as in run-eval)"))
    add_preprocess_args(p)
    add_pixel_cache_args(p)
    g = p.add_argument_group("decoding")
    from engine.procs import usable_cores

    g.add_argument("--workers", type=positive_int, default=usable_cores(),
                   help="decode worker processes (default: every usable core, %(default)s here)")
    g.add_argument("--batch-size", type=positive_int, default=64, help="images per ring slot (default: %(default)s)")
    g.add_argument("--max-image-pixels", type=positive_int, default=None, metavar="N",
                   help="as run-eval: fail images with more pixels than this (default: Pillow's limit); the cache "
                        "is keyed by it")
    g.add_argument("--image-timeout", type=non_negative_float, default=120.0, metavar="S",
                   help="as run-eval (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    e = p.add_argument_group("export (ModelZoo .bin files)")
    e.add_argument("--export-bin", metavar="OUT",
                   help="also write one raw .bin per cached image into OUT, plus prep_bin.info and images.tsv "
                        "(index, path, label, file)")
    e.add_argument("--export-format", choices=EXPORT_FORMATS, default="uint8-hwc",
                   help="uint8-hwc: the crop's bytes (default); float32-nchw: (x/255 - mean)/std with --mean/--std "
                        "(default: the --model preset's)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _windows(state: np.ndarray, miss: int, batch: int) -> List[Tuple[int, int]]:
    """[lo, hi) batches of `batch` images (aligned to multiples of `batch`) that hold a missing image."""
    n = len(state)
    out = []
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        if np.any(state[lo:hi] == miss):
            out.append((lo, hi))
    return out


async def _fill(source, windows: List[Tuple[int, int]], progress) -> None:
    futures = []
    done = [0]
    t0 = time.monotonic()

    def finished(f: "asyncio.Future") -> None:
        if f.cancelled() or f.exception() is not None:
            return
        batch = f.result()
        batch.release()  # after the cache's write of it (CacheSource holds the slot until then)
        done[0] += batch.n
        progress(done[0], time.monotonic() - t0)

    if windows:
        await source.start(windows[0][0], windows[-1][1])
    for b, (lo, hi) in enumerate(windows):
        fut = await source.fill(b, lo, hi - lo)
        fut.add_done_callback(finished)
        futures.append(fut)
    try:
        await asyncio.gather(*futures)
    finally:
        for f in futures:
            f.cancel()
    await source.finish()


def make_cache(cfg, export: Optional[str] = None, export_format: str = "uint8-hwc", log=None) -> Tuple[Dict, int]:
    """Fill `cfg.pixel_cache` for `cfg.data`; returns (summary, exit status)."""
    from engine.evaluate import run_stoppable
    from engine.pipeline.dataset import build_dataset
    from engine.pipeline.pixelcache import MISS, PixelCache, PixelCacheError, export_bin
    from engine.pipeline.pool import WorkerPool
    from engine.pipeline.ring import Ring
    from engine.pipeline.scheduler import new_event_loop
    from engine.pipeline.sources import CacheSource
    from engine.report.output import Progress

    log = log if log is not None else sys.stderr
    t0 = time.monotonic()
    ds = build_dataset(cfg.data, cfg.labels, cfg.limit, cfg.num_classes)
    cache = PixelCache.open(cfg.pixel_cache, ds, cfg.preprocess, cfg.max_image_pixels, verify=cfg.cache_verify,
                            write=True)
    stopped = None
    source = None
    try:
        missing = int((cache.state == MISS).sum())
        before = len(ds) - missing
        windows = _windows(cache.state, MISS, cfg.batch_size)
        if missing and not cache.writable:
            raise PixelCacheError(cache.note or f"pixel cache {cache.dir}: cannot be written")
        if cfg.progress:
            print(f"make-cache: {len(ds):,} images, {before:,} already cached, {missing:,} to decode with "
                  f"{cfg.workers} worker(s) into {cache.dir}", file=log)
        if windows:
            slots = max(4, 2 + -(-2 * cfg.workers * 16 // cfg.batch_size))  # enough chunks for every worker
            ring = Ring(slots, cfg.batch_size, cfg.preprocess.shape)
            pool = WorkerPool(ring, ds, cfg.preprocess, cfg.workers, image_timeout=cfg.image_timeout,
                              max_image_pixels=cfg.max_image_pixels)
            source = CacheSource(cache, ds, pool, ring, ahead=slots, write=True, log=log)
            progress = Progress(sum(hi - lo for lo, hi in windows), cfg.progress, label="cached")
            loop = new_event_loop()
            task = loop.create_task(_fill(source, windows, progress))
            try:
                stopped = run_stoppable(loop, task, ring, on_stop=pool.stopping)
            finally:
                source.close()
                pool.close()
                loop.close()
                ring.close()
                progress.close()
        if cache.writable:
            cache.flush()  # the completion record: what is stored is durable and visible to readers
        exported = None
        if export and stopped is None:
            total = len(ds)
            bar = Progress(total, cfg.progress, label="exported")
            count = [0]
            t1 = time.monotonic()

            def step(k: int) -> None:
                count[0] += k
                bar(count[0], time.monotonic() - t1)

            exported = export_bin(cache, ds, export, export_format, cfg.preprocess.mean, cfg.preprocess.std, step)
            bar.close()
        stats = dict(source.stats()) if source is not None else dict(cache.stats())
        stats.setdefault("decoded", 0)
    finally:
        cache.close()
    state_left = stats.get("images", len(ds)) - stats.get("valid", 0)
    summary = dict(stats, images=len(ds), cached_before=before, missing_before=missing, left=int(state_left),
                   exported=exported, export=export, export_format=export_format if export else None,
                   wall_s=time.monotonic() - t0, stopped=stopped is not None)
    if summary.get("write_error"):
        status = EXIT_ERROR
    elif stopped is not None:
        status = 128 + stopped
    else:
        status = EXIT_OK if state_left == 0 else EXIT_ERROR
    return summary, status


def format_summary(s: Dict) -> str:
    gb = s.get("bytes", 0) / 1e9
    lines = [f"{'STOPPED ' if s['stopped'] else ''}make-cache: {s['dir']}",
             f"  images        {s['images']:,}: {s['cached_before']:,} were cached, {s.get('written', 0):,} decoded "
             f"and stored now, {s.get('written_failed', 0):,} failed images stored with their reasons, "
             f"{s['left']:,} still missing",
             f"  on disk       {gb:.2f} GB, {s['wall_s']:.1f} s"]
    if s.get("rejected"):
        lines.append(f"  rejected      {s['rejected']:,} entries did not match (stale file, other key, bad record): "
                     "decoded again")
    if s.get("write_error"):
        lines.append(f"  stopped writing: {s['write_error']}")
    if s["export"]:
        lines.append(f"  exported      {s['exported'] or 0:,} .bin files ({s['export_format']}) to {s['export']}")
    if s["stopped"]:
        lines.append("  stopped early: what was stored is kept; run the same command again to complete it")
    return "\n".join(lines)


def make_cache_main(argv: Optional[List[str]] = None) -> int:
    from engine.backends.base import BackendError
    from engine.cli import config_from_args_for_cache
    from engine.config import ConfigError
    from engine.pipeline.dataset import DatasetError
    from engine.pipeline.pixelcache import PixelCacheError
    from engine.pipeline.pool import PoolError
    from engine.pipeline.ring import RingError

    p = cache_parser()
    a = p.parse_args(argv)
    if not a.data:
        p.error("--data is required")
    try:
        cfg = config_from_args_for_cache(a)
        summary, status = make_cache(cfg, a.export_bin, a.export_format)
    except (ConfigError, DatasetError) as e:
        print(f"make-cache: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (PixelCacheError, PoolError, RingError, BackendError, OSError) as e:
        print(f"make-cache: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(format_summary(summary))
    return status


if __name__ == "__main__":  # pragma: no cover
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(make_cache_main())

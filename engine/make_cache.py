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
import signal
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from engine import __version__
from engine.errors import EXIT_ERROR, EXIT_OK, exit_for_signal

EXPORT_FORMATS = ("uint8-hwc", "float32-nchw")


def cache_parser() -> argparse.ArgumentParser:
    from engine.cli import add_data_args, add_image_fault_args, add_pixel_cache_args, add_preprocess_args, default, positive_int

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
    g.add_argument("--batch-size", type=positive_int, default=default("batch_size"),
                   help="images per ring slot (default: %(default)s)")
    add_image_fault_args(g)
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


def make_cache(cfg, export: Optional[str] = None, export_format: str = "uint8-hwc", log=None) -> Tuple[Dict, int]:
    """Fill `cfg.pipeline.pixel_cache` for `cfg.data.path`; returns (summary, exit status). A driver over a
    decode-only Session (engine/pipeline/session.py): no backend, the pixel cache's write-through."""
    from engine.pipeline.dataset import build_dataset
    from engine.pipeline.pixelcache import MISS, PixelCacheError, export_bin
    from engine.pipeline.session import Session
    from engine.pipeline.sources import CacheSource
    from engine.report.output import Progress

    log = log if log is not None else sys.stderr
    t0 = time.monotonic()
    ds = build_dataset(cfg.data.path, cfg.data.labels, cfg.data.limit, cfg.data.num_classes)
    slots = max(4, 2 + -(-2 * cfg.pipeline.workers * 16 // cfg.pipeline.batch_size))  # enough chunks for every worker
    session = Session(cfg, ds, device=False, handle_signals=True, ring_slots=slots, log=log)
    try:
        session.open()
        if session.stopped is not None:  # a stop signal while opening: nothing was decoded
            return {"dir": cfg.pipeline.pixel_cache, "images": len(ds), "stopped": True}, exit_for_signal(session.stopped)
        cache = session.cache
        assert cache is not None, "a make-cache Session opens the pixel cache"
        missing = int((cache.state == MISS).sum())
        before = len(ds) - missing
        windows = _windows(cache.state, MISS, cfg.pipeline.batch_size)
        if missing and not cache.writable:
            raise PixelCacheError(cache.note or f"pixel cache {cache.dir}: cannot be written")
        if cfg.pipeline.progress:
            print(f"make-cache: {len(ds):,} images, {before:,} already cached, {missing:,} to decode with "
                  f"{cfg.pipeline.workers} worker(s) into {cache.dir}", file=log)
        if windows:
            progress = Progress(sum(hi - lo for lo, hi in windows), cfg.pipeline.progress, label="cached")
            try:
                session.fill(windows, progress)
            finally:
                progress.close()
        stopped = session.stopped
        if cache.writable:
            cache.flush()  # the completion record: what is stored is durable and visible to readers
        exported = None
        if export and stopped is None:
            total = len(ds)
            bar = Progress(total, cfg.pipeline.progress, label="exported")
            count = [0]
            t1 = time.monotonic()

            def step(k: int) -> None:
                count[0] += k
                bar(count[0], time.monotonic() - t1)

            exported = export_bin(cache, ds, export, export_format, cfg.preprocess.mean, cfg.preprocess.std, step)
            bar.close()
        assert isinstance(session.source, CacheSource), "a make-cache Session reads and writes the pixel cache"
        stats = dict(session.source.stats())
        stats.setdefault("decoded", 0)
    finally:
        session.close()
    state_left = stats.get("images", len(ds)) - stats.get("valid", 0)
    summary = dict(stats, images=len(ds), cached_before=before, missing_before=missing, left=int(state_left),
                   exported=exported, export=export, export_format=export_format if export else None,
                   wall_s=time.monotonic() - t0, stopped=stopped is not None)
    if summary.get("write_error"):
        status = EXIT_ERROR
    elif stopped is not None:
        status = exit_for_signal(stopped)
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
    from engine.commands import main

    return main("make-cache", _make_cache_command, argv)


def _make_cache_command(argv: Optional[List[str]]) -> int:
    from engine.cli import config_from_args_for_cache

    p = cache_parser()
    a = p.parse_args(argv)
    if not a.data:
        p.error("--data is required")
    cfg = config_from_args_for_cache(a)
    summary, status = make_cache(cfg, a.export_bin, a.export_format)
    print(format_summary(summary) if "cached_before" in summary else
          "STOPPED make-cache: stopped before it started; nothing was decoded")
    return status


if __name__ == "__main__":  # pragma: no cover
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(make_cache_main())

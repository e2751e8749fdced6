"""`run-score`: top-k predictions for every image of a folder or list, in parts, exactly once.

    --data DIR|LIST -> manifest (frozen, hashed) -> OUT/manifest.tsv + OUT/run.json
    shard i/n -> its contiguous range of parts -> minus the parts already done -> pending parts
    pending ids -> ring + worker pool -> backend (one run_pipeline per contiguous run of parts)
    -> reduce: softmax + top-k, rows routed into per-part buffers (batches finish in any order)
    -> a buffer that has all its rows -> the writer thread -> commit (NOTE in engine/scoring/writer.py)
    -> every part of the manifest done -> OUT/_SUCCESS

Resuming is the default: OUT/run.json holds the manifest hash and the configuration that
decides the rows (model, weights hash, backend, precision, preprocessing, top-k, format, part
size); a run whose manifest or configuration differs is refused, one that matches skips the
parts already done. With `--ray`, engine/scoring/ray_runner.py runs the same `PartScorer` in Ray actors.

Exit statuses: 0 every image of this shard scored; 1 some images failed (error rows); 2 bad
options, or OUT belongs to another run; 3 the run could not go on (disk full, worker, backend
or shared-memory error); 130/143 stopped by SIGINT/SIGTERM (finished parts are kept).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Mapping, Optional, Tuple

from engine import __version__
from engine.config import RunConfig
from engine.errors import EXIT_ERROR, EXIT_FAILED_IMAGES, EXIT_OK
from engine.scoring.job import (DEFAULT_PART_SIZE,
                                ScoreOptions, ScoreStats, open_job, score_local)
from engine.scoring.writer import FORMATS


# -- the command --------------------------------------------------------------------------------
def _span(parts: range) -> str:
    if len(parts) == 0:
        return "no parts"
    return f"part {parts.start}" if len(parts) == 1 else f"parts {parts.start}-{parts.stop - 1}"


def format_summary(s: Dict) -> str:
    lines = [
        f"{'STOPPED ' if s['stopped'] else ''}Bulk scoring: {s['model']} on {s['backend']}, top-{s['topk']}, "
        f"{s['format']} -> {s['out']}",
        f"  manifest      {s['manifest_images']:,} images in {s['parts_total']:,} parts of {s['part_size']:,}, "
        f"sha256 {s['manifest_sha256'][:16]}",
        f"  shard         {s['shard']} ({s['shard_source']}): {s['shard_parts']}; {s['parts_done_before']:,} were done, "
        f"{s['parts_written']:,} written now, {s['parts_left']:,} left",
        f"  images        {s['images']:,} scored this run, {s['failed']:,} failed (error rows); "
        f"{s['shard_failed']:,} error rows in the shard's done parts",
        f"  wall time     {s['wall_s']:.2f} s, {s['img_per_s']:,.1f} img/s (writer thread busy {s['writer_s']:.2f} s)",
        f"  output        {s['parts_done_total']:,}/{s['parts_total']:,} parts done"
        + (", _SUCCESS written" if s["success"] else ""),
    ]
    if s["stopped"]:
        lines.append("  stopped early: finished parts are kept; run the same command again to resume")
    return "\n".join(lines)


def run_score(cfg: RunConfig, opts: ScoreOptions, out=None, environ: Mapping[str, str] = os.environ
              ) -> Tuple[Dict, int]:
    """Score `cfg.data.path` into `opts.out`; prints the summary; returns (summary, exit status)."""
    out = out or sys.stdout
    t0 = time.monotonic()
    if opts.ray is not None and cfg.backend.devices:
        from engine.config import ConfigError

        raise ConfigError("--devices with --ray: Ray places its actors on the devices itself (one per GPU/NPU, "
                          "--ray-actors); drop --devices")
    if opts.ray is None and cfg.backend.name == "auto" and not cfg.backend.devices:  # --devices: a device process picks
        from engine.backends import resolve_auto

        cfg = cfg.replace(backend=resolve_auto())
    job = open_job(cfg, opts, environ)
    i, n = job.shard
    if cfg.pipeline.progress:
        print(f"run-score: {len(job.manifest):,} images, {job.out.num_parts:,} parts; shard {i}/{n} "
              f"({job.shard_source}): {_span(job.parts)}, {len(job.done_before):,} done, "
              f"{len(job.pending):,} to score ({job.pending_images():,} images)", file=sys.stderr)
    stopped = None
    backend_info: Dict = {"backend": cfg.backend.name}
    if not job.pending:
        stats = ScoreStats()
    elif opts.ray is not None:
        from engine.scoring.ray_runner import score_ray

        stats, backend_info, stopped = score_ray(job)
    else:
        stats, backend_info, stopped = score_local(job)
    wall = time.monotonic() - t0
    success = job.out.write_success({"manifest_sha256": job.manifest.sha256, "run": job.meta,
                                     "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    shard_records = job.out.done_records(job.parts)
    summary = {
        "out": job.out.path, "model": cfg.model.ts or cfg.model.name, "backend": backend_info.get("backend", cfg.backend.name),
        "backend_info": backend_info, "topk": job.meta["topk"], "format": opts.fmt,
        "manifest_images": len(job.manifest), "manifest_sha256": job.manifest.sha256,
        "part_size": opts.part_size, "parts_total": job.out.num_parts, "shard": f"{i}/{n}",
        "shard_source": job.shard_source, "shard_parts": _span(job.parts),
        "parts_done_before": len(job.done_before), "parts_written": stats.parts_written,
        "parts_left": len(job.parts) - len(shard_records),
        "images": stats.images, "failed": stats.failed,
        "shard_failed": sum(r["failed"] for r in shard_records.values()),
        "wall_s": wall, "img_per_s": stats.images / stats.wall_s if stats.wall_s > 0 else 0.0,
        "score_wall_s": stats.wall_s, "writer_s": stats.writer_s,
        "parts_done_total": len(job.out.done_records(range(job.out.num_parts))),
        "success": success, "stopped": stopped is not None, "version": __version__,
    }
    text = format_summary(summary)
    if stats.pixel_cache is not None:
        from engine.evaluate import format_pixel_cache

        summary["pixel_cache"] = stats.pixel_cache
        text += "\n" + format_pixel_cache(stats.pixel_cache)
    print(text, file=out)
    if stopped is not None:
        return summary, 128 + stopped
    if summary["parts_left"]:
        return summary, EXIT_ERROR  # only when a part could not be scored without raising
    return summary, EXIT_FAILED_IMAGES if summary["shard_failed"] else EXIT_OK


def score_parser() -> argparse.ArgumentParser:
    from engine.cli import add_model_args, add_pipeline_args, add_pixel_cache_args, add_preprocess_args, positive_int

    p = argparse.ArgumentParser(
        prog="run-score", allow_abbrev=False,
        description="Top-k predictions for every image of a folder or list into parquet/jsonl/csv parts: "
                    "exactly once, resumable, sharded, optionally on a Ray cluster.")
    g = p.add_argument_group("data and output")
    g.add_argument("--data", metavar="DIR|LIST",
                   help="a folder (searched recursively for images), a text file with one path per line "
                        "(relative to the file's folder), or containers: a tar, WebDataset shards, Parquet shards, "
                        "local or s3://... (docs/usage.md)")
    g.add_argument("--out", metavar="DIR",
                   help="output folder: parts, their .done records, manifest.tsv, run.json, _SUCCESS")
    g.add_argument("--topk", type=positive_int, default=5, help="classes per image (default: %(default)s)")
    g.add_argument("--format", choices=FORMATS, default="parquet", help="(default: %(default)s)")
    g.add_argument("--part-size", type=positive_int, default=DEFAULT_PART_SIZE,
                   help="images per output part (default: %(default)s)")
    g.add_argument("--limit", type=positive_int, help="only the first N images of the manifest")
    g.add_argument("--shard", metavar="I/N",
                   help="score shard I of N (a contiguous range of parts); default: from "
                        "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, else RANK/WORLD_SIZE, else 0/1")
    g.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="skip the parts already done in --out (the default)")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="refuse to run if --out already holds a run")
    g.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    g.add_argument("--summarize", metavar="OUT",
                   help="score nothing: read every done part of the output folder OUT (all shards, from Slurm or "
                        "Ray) and print exact top-1/top-5 counts under run-eval's JSON names, written to "
                        "OUT/summary.json (or --json PATH); needs rows with labels (--data a labelled folder)")
    r = p.add_argument_group("ray")
    r.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="run on a Ray cluster: --ray (the cluster this machine belongs to), --ray ADDRESS, or "
                        "--ray local (start a local one); needs `pip install .[ray]`")
    r.add_argument("--ray-actors", type=positive_int, default=0,
                   help="scoring actors (default: one per GPU/NPU of the cluster; on cpu/sim, one)")
    add_model_args(p)
    add_preprocess_args(p)
    add_pipeline_args(p)
    add_pixel_cache_args(p)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def run_score_main(argv: Optional[List[str]] = None, environ: Mapping[str, str] = os.environ) -> int:
    from engine.commands import main

    return main("run-score", lambda args: _run_score_command(args, environ), argv)


def _run_score_command(argv: Optional[List[str]], environ: Mapping[str, str]) -> int:
    from engine.cli import config_from_args
    from engine.report.output import write_json

    p = score_parser()
    a = p.parse_args(argv)
    if a.summarize:
        from engine.scoring.summary import format_summary, summarize

        summary = summarize(a.summarize)
        print(format_summary(summary))
        path = a.json or os.path.join(a.summarize, "summary.json")
        write_json(path, summary)
        return EXIT_OK
    if not a.data or not a.out:
        p.error("--data and --out are required (or --summarize OUT)")
    cfg = config_from_args(a, data=a.data, limit=a.limit, labels=None, json_path=a.json)
    opts = ScoreOptions(out=a.out, topk=a.topk, fmt=a.format, part_size=a.part_size, shard=a.shard,
                        resume=a.resume, ray=a.ray, ray_actors=a.ray_actors)
    summary, status = run_score(cfg, opts, environ=environ)
    if a.json:
        write_json(a.json, summary)
    return status

"""A `run-score` job and its parts: options, the output folder's fingerprint, and `PartScorer`,
which scores a list of parts through the pipeline (in this process or in a Ray actor).

The command itself (parser, summary, exit statuses) is engine/scoring/run.py; the Ray runner
(engine/scoring/ray_runner.py) imports this module only, so neither imports the other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from engine import __version__
from engine.classes import imagenet_classes
from engine.config import RunConfig
from engine.files import file_sha256
from engine.scoring.manifest import MANIFEST_FILE, Manifest, build_manifest, resolve_shard, shard_parts
from engine.report.metrics import topk_indices
from engine.pipeline.scheduler import BatchResult, PipelineStats
from engine.scoring.writer import (RUN_FILE, OutputDir, OutputError, PartRows, PartWriter,
                           RowEncoder, create_once)

EXIT_OK, EXIT_FAILED_IMAGES, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3
DEFAULT_PART_SIZE = 10000

# The run.json keys that decide the rows: a resume must match every one of them.
FINGERPRINT_KEYS = ("manifest_sha256", "manifest_images", "part_size", "format", "topk", "model", "weights_sha256",
                    "ts_sha256", "backend", "precision", "num_classes", "preprocessing", "max_image_pixels")


class MismatchError(ValueError):
    """OUT holds another run (other manifest or configuration); the message lists the differences."""


@dataclass(frozen=True)
class ScoreOptions:
    """What `run-score` adds to a `RunConfig`."""

    out: str
    topk: int = 5
    fmt: str = "parquet"
    part_size: int = DEFAULT_PART_SIZE
    shard: Optional[str] = None  # "i/n"; None: from the environment
    resume: bool = True
    ray: Optional[str] = None  # None: local; "local": a local Ray cluster; else a cluster address
    ray_actors: int = 0  # 0: one per accelerator


def _json_roundtrip(d: Dict) -> Dict:
    return json.loads(json.dumps(d, sort_keys=True))


def run_metadata(cfg: RunConfig, opts: ScoreOptions, manifest: Manifest) -> Dict:
    """run.json: the fingerprint (FINGERPRINT_KEYS) plus what is useful to know about the run."""
    weights_sha = file_sha256(cfg.weights) if cfg.weights and os.path.isfile(cfg.weights) else None
    if cfg.weights and weights_sha is None and not cfg.ts:  # a weights tag counts by its file's sha256
        from engine.models.zoo import weights_sha256

        weights_sha = weights_sha256(cfg.model, cfg.weights)
    ts_sha = file_sha256(cfg.ts) if cfg.ts and os.path.isfile(cfg.ts) else None
    meta = {
        "manifest_sha256": manifest.sha256, "manifest_images": len(manifest), "part_size": opts.part_size,
        "format": opts.fmt, "topk": min(opts.topk, cfg.num_classes), "model": cfg.model,
        "weights_sha256": weights_sha, "ts_sha256": ts_sha, "backend": cfg.backend,
        "precision": cfg.precision, "num_classes": cfg.num_classes,
        "preprocessing": dataclasses.asdict(cfg.preprocess),
        "max_image_pixels": getattr(cfg, "max_image_pixels", None),  # which huge images fail
        # not compared on resume:
        "engine": "imagenet-engine", "engine_version": __version__, "weights": cfg.weights, "ts": cfg.ts,
        "data_root": manifest.root, "parts": manifest.num_parts(opts.part_size),
        "columns": ["id", "path", "topk_index", "topk_prob", "top1_wnid", "top1_name", "error"],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return _json_roundtrip(meta)


def _differences(old: Dict, new: Dict) -> List[str]:
    out = []
    for k in FINGERPRINT_KEYS:
        if old.get(k) != new.get(k):
            a, b = json.dumps(old.get(k)), json.dumps(new.get(k))
            if k == "manifest_sha256":
                a, b = a[:14] + '..."', b[:14] + '..."'
            out.append(f"{k}: {a} there, {b} now")
    return out


@dataclass
class Job:
    """One process's share of a scoring run: the folder, the manifest and the parts to score."""

    cfg: RunConfig
    opts: ScoreOptions
    manifest: Manifest
    meta: Dict
    out: OutputDir
    shard: Tuple[int, int]
    shard_source: str
    parts: range  # this shard's parts
    done_before: Dict[int, Dict]  # part -> done record, at start
    pending: List[int]

    def pending_images(self) -> int:
        return sum(self.part_size_of(p) for p in self.pending)

    def part_size_of(self, part: int) -> int:
        lo, hi = self.manifest.part_range(part, self.opts.part_size)
        return hi - lo


def open_output(cfg: RunConfig, opts: ScoreOptions, manifest: Manifest) -> Tuple[OutputDir, Dict]:
    """Create OUT with manifest.tsv and run.json, or check that they match this run (resume)."""
    meta = run_metadata(cfg, opts, manifest)
    out = OutputDir(opts.out, manifest.num_parts(opts.part_size), opts.fmt)
    try:
        os.makedirs(out.path, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {opts.out}: cannot create the folder ({e.strerror or e})")
    run_path = out.file(RUN_FILE)
    if os.path.exists(run_path):
        if not opts.resume:
            raise MismatchError(f"--out {opts.out} already holds a scoring run ({RUN_FILE}); run without "
                                "--no-resume to resume it, or give a new --out")
        old = _read_json(run_path)
        diff = _differences(old, meta)
        if diff:
            raise MismatchError(
                f"--out {opts.out} holds a run with another manifest or configuration, refusing to mix them:\n  "
                + "\n  ".join(diff)
                + "\nresume with the same --data and options, or give a new --out")
    manifest_path = out.file(MANIFEST_FILE)
    if not create_once(manifest_path, manifest.text().encode("utf-8", "surrogateescape")):
        sha = _header_sha(manifest_path)
        if sha != manifest.sha256:
            raise MismatchError(
                f"--out {opts.out} holds the manifest of other images ({MANIFEST_FILE} sha256 {str(sha)[:12]}..., "
                f"this --data gives {len(manifest):,} images, sha256 {manifest.sha256[:12]}...: files added, "
                "removed or resized); give a new --out, or the --data it was made from")
    if not create_once(run_path, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode()):
        diff = _differences(_read_json(run_path), meta)  # another shard created it meanwhile
        if diff:
            raise MismatchError(f"--out {opts.out}: another process started a different run there:\n  "
                                + "\n  ".join(diff))
    return out, meta


def _read_json(path: str) -> Dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise OutputError(f"{path}: unreadable ({e}); move it away to start afresh")


def _header_sha(path: str) -> Optional[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for _ in range(8):
            line = f.readline()
            if line.startswith("# sha256\t"):
                return line.split("\t", 1)[1].strip()
    return None


def open_job(cfg: RunConfig, opts: ScoreOptions, environ: Mapping[str, str] = os.environ) -> Job:
    """Freeze the manifest, open (or check) OUT, pick this shard's parts and the pending ones."""
    manifest = build_manifest(cfg.data, cfg.limit)
    out, meta = open_output(cfg, opts, manifest)
    i, n, source = resolve_shard(opts.shard, environ)
    parts = shard_parts(out.num_parts, i, n)
    done = out.done_records(parts)
    pending = [p for p in parts if p not in done]
    out.remove_stale(pending)
    return Job(cfg, opts, manifest, meta, out, (i, n), source, parts, done, pending)


# -- scoring ------------------------------------------------------------------------------------
def topk_rows(logits: np.ndarray, k: int) -> np.ndarray:
    """The k best classes per row, best first, ties to the lower index (as engine.report.metrics.topk_indices).

    Small k: k passes of argmax (argmax returns the first maximum, so ties go to the lower index);
    -inf is lifted to the lowest finite value first so that a taken class (-inf) sorts below it.
    Large k: argpartition, then an exact tie-break (topk_indices) for rows tied at the k-th value.
    """
    n, c = logits.shape
    k = min(k, c)
    if k <= 16:
        work = np.maximum(logits, -np.finfo(logits.dtype).max)  # a copy; -inf only for taken classes
        rows = np.arange(n)
        idx = np.empty((n, k), np.int64)
        for j in range(k):
            best = work.argmax(axis=1)
            idx[:, j] = best
            work[rows, best] = -np.inf
        return idx
    if k == c:
        return topk_indices(logits, k)
    part = np.argpartition(logits, c - k, axis=1)[:, c - k:]
    vals = np.take_along_axis(logits, part, axis=1)
    idx = np.take_along_axis(part, np.lexsort((part, -vals), axis=-1), axis=1)
    tied = (logits >= vals.min(axis=1, keepdims=True)).sum(axis=1) > k
    if tied.any():
        idx[tied] = topk_indices(logits[tied], k)
    return idx


def softmax_topk(logits: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int32 top-k classes, float32 softmax probabilities of those classes, bool row is finite).

    A row with NaN or +inf (or only -inf) has no softmax: it is reported not finite and its
    top-k is meaningless (computed on zeros, so nothing here fails on it).
    """
    x = np.asarray(logits, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        m = x.max(axis=1, keepdims=True)
        e = np.exp(x - m)
        total = e.sum(axis=1, dtype=np.float64)
    finite = np.isfinite(m[:, 0]) & np.isfinite(total)
    if not finite.all():
        x = x.copy()
        x[~finite] = 0.0
        e[~finite] = 1.0
        total[~finite] = x.shape[1]
    idx = topk_rows(x, k)
    prob = np.take_along_axis(e, idx, axis=1) / total[:, None]
    return idx.astype(np.int32), prob.astype(np.float32), finite


class _PartBuffer:
    __slots__ = ("part", "lo", "n", "idx", "prob", "errors", "have", "count")

    def __init__(self, part: int, lo: int, hi: int, k: int):
        self.part, self.lo, self.n = part, lo, hi - lo
        self.idx = np.zeros((self.n, k), np.int32)
        self.prob = np.zeros((self.n, k), np.float32)
        self.errors: List[Optional[str]] = [None] * self.n
        self.have = np.zeros(self.n, bool)
        self.count = 0


class PartRouter:
    """The reducer: each finished batch's rows go to their parts; a full part goes to the writer."""

    def __init__(self, manifest: Manifest, part_size: int, k: int, writer: PartWriter):
        self.manifest, self.part_size, self.k, self.writer = manifest, part_size, k, writer
        self.buffers: Dict[int, _PartBuffer] = {}
        self.images = 0
        self.failed = 0

    def reduce(self, r: BatchResult) -> None:
        if self.writer.error is not None:
            raise self.writer.error  # stop scoring: nothing more can be committed
        ids = np.asarray(r.indices, np.int64)
        n = len(ids)
        idx, prob, finite = softmax_topk(r.logits, self.k)
        reasons: Dict[int, str] = {int(row): reason for row, reason in r.failures}
        bad = ~np.asarray(r.ok, dtype=bool) | ~finite
        if bad.any():
            for row in np.nonzero(bad)[0].tolist():
                if row not in reasons:
                    reasons[row] = ("the model's output is not finite (NaN or inf)" if r.ok[row]
                                    else "not decoded (no reason reported)")
        parts = ids // self.part_size
        if n and parts[0] == parts[-1]:
            groups = [(int(parts[0]), slice(0, n))]  # the usual case: the whole batch in one part
        else:
            groups = [(int(p), np.nonzero(parts == p)[0]) for p in np.unique(parts)]
        for p, rows in groups:
            buf = self.buffers.get(p)
            if buf is None:
                lo, hi = self.manifest.part_range(p, self.part_size)
                buf = self.buffers[p] = _PartBuffer(p, lo, hi, self.k)
            at = ids[rows] - buf.lo
            if buf.have[at].any():
                raise RuntimeError(f"part {p}: ids {(ids[rows][buf.have[at]])[:5].tolist()} were reduced twice")
            buf.have[at] = True
            buf.idx[at] = idx[rows]
            buf.prob[at] = prob[rows]
            buf.count += len(at)
            for row, reason in reasons.items():
                if buf.lo <= ids[row] < buf.lo + buf.n:
                    buf.errors[int(ids[row]) - buf.lo] = reason
                    self.failed += 1
            if buf.count == buf.n:
                del self.buffers[p]
                self.writer.submit(PartRows(p, buf.lo, self.manifest.paths[buf.lo:buf.lo + buf.n],
                                            buf.idx, buf.prob, buf.errors))
        self.images += n


def contiguous_runs(parts: Sequence[int]) -> List[Tuple[int, int]]:
    """[(first, last + 1)] of consecutive part numbers."""
    runs: List[Tuple[int, int]] = []
    for p in sorted(parts):
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


@dataclass
class ScoreStats:
    images: int = 0
    failed: int = 0
    parts_written: int = 0
    wall_s: float = 0.0
    writer_s: float = 0.0
    records: List[Dict] = field(default_factory=list)
    pipeline: PipelineStats = field(default_factory=PipelineStats)
    pixel_cache: Optional[Dict] = None  # --pixel-cache: hits, written, rejected ... (local runs)


class PartScorer:
    """This engine's local pipeline (ring, worker pool, backend) scoring whole parts into OUT.

    `open()` once, `score(parts)` any number of times (a Ray actor scores part after part with
    the same pool and model), `close()` once.
    """

    def __init__(self, cfg: RunConfig, manifest: Manifest, out: OutputDir, meta: Dict, topk: int, part_size: int):
        from engine.backends import create_backend

        self.manifest, self.out, self.meta = manifest, out, meta
        self.k, self.part_size = min(topk, cfg.num_classes), part_size
        self.backend = create_backend(cfg)
        self.cfg = cfg.replace(backend=self.backend.name)
        classes = imagenet_classes() if cfg.num_classes == 1000 else None
        parquet_meta = {
            "model": meta["model"], "weights_sha256": meta.get("weights_sha256") or "",
            "preprocessing": meta["preprocessing"], "engine_version": __version__,
            "manifest_sha256": meta["manifest_sha256"], "imagenet_engine": meta,
        }
        self.encoder = RowEncoder(out.fmt, classes, parquet_meta)
        self.ring = None
        self.pool = None
        self.cache = None  # --pixel-cache: the open PixelCache, read by `source`
        self.source = None
        self.pixel_cache: Optional[Dict] = None  # its report object, once closed
        self.loop = None
        self.task: Optional[asyncio.Task] = None
        self.stop_signal: Optional[int] = None

    def open(self) -> None:
        from engine.pipeline.pool import WorkerPool
        from engine.pipeline.encoded import make_ring
        from engine.pipeline.scheduler import new_event_loop

        cfg = self.cfg
        self.loop = new_event_loop()
        self.backend.prepare(cfg.batch_size)
        # one model call on a resident batch, so the first parts do not pay the device's warm-up
        # (lazy initialisation, cuDNN autotuning); run-eval gets the same from its compute-only run
        self.backend.compute_only(cfg.batch_size, 1, warmup=0)
        self.ring = make_ring(cfg)  # with a byte arena for --decode device
        self.backend.register_host_memory(self.ring.buffer())
        # the fault settings of run-eval (getattr: they arrive with the pool's fault-handling options)
        extra = {"image_timeout": getattr(cfg, "image_timeout", 120.0)}
        if getattr(cfg, "max_image_pixels", None) is not None:
            extra["max_image_pixels"] = cfg.max_image_pixels
        dataset = self.manifest.dataset()
        self.pool = WorkerPool(self.ring, dataset, cfg.preprocess, cfg.workers, **extra)
        if getattr(cfg, "pixel_cache", None):
            # the cache first, the pool (started only if something must be decoded) for the rest
            from engine.evaluate import open_pixel_cache
            from engine.pipeline.sources import CacheSource

            self.cache, write = open_pixel_cache(cfg, dataset)
            self.source = CacheSource(self.cache, dataset, self.pool, self.ring,
                                      cfg.batch_size if self.backend.static_shape else 0, ahead=cfg.slots,
                                      write=write)
        else:
            self.loop.run_until_complete(self.pool.start())

    def describe(self) -> Dict:
        return self.backend.describe()

    def score(self, parts: Sequence[int], progress: Optional[Callable[[int, float], None]] = None,
              handle_signals: bool = False) -> ScoreStats:
        """Score and commit these parts. Raises the writer's error (disk full) or the pool's."""
        assert self.loop is not None, "open() first"
        stats = ScoreStats()
        self.task = self.loop.create_task(self._score(list(parts), stats, progress))
        signals = None
        if handle_signals:
            from engine.evaluate import StopSignals

            signals = StopSignals(self.loop, self.task, self.ring)
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            if signals is None or signals.signum is None:
                raise
            self.stop_signal = signals.signum
        finally:
            if signals is not None:
                signals.remove()
            self.task = None
        return stats

    async def _score(self, parts: List[int], stats: ScoreStats, progress) -> None:
        from engine.pipeline.scheduler import run_pipeline
        from engine.pipeline.encoded import make_source

        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def on_error(e: BaseException) -> None:  # in the writer thread: stop the pipeline now
            loop.call_soon_threadsafe(task.cancel)

        writer = PartWriter(self.out, self.encoder, on_error, extra={"engine_version": __version__})
        router = PartRouter(self.manifest, self.part_size, self.k, writer)
        t0 = time.monotonic()
        cfg, n = self.cfg, len(self.manifest)

        def prog(done: int, elapsed: float) -> None:
            if progress is not None:
                progress(base + done, time.monotonic() - t0)

        try:
            base = 0
            for first, end in contiguous_runs(parts):
                lo = self.manifest.part_range(first, self.part_size)[0]
                hi = min(n, end * self.part_size)
                if self.source is not None:  # one CacheSource for every run: its slots outlive a run
                    source = self.source
                    await source.start(lo, hi)
                else:
                    source = make_source(self.pool, self.ring, self.backend, cfg,
                                         cfg.batch_size if self.backend.static_shape else 0)
                await run_pipeline(source, self.backend, hi, cfg.batch_size, cfg.inflight,
                                   router.reduce, prog, start=lo, stats=stats.pipeline)
                base += hi - lo
            if self.source is not None:
                await self.source.finish()
        except asyncio.CancelledError:
            if writer.error is not None:
                raise writer.error
            raise
        finally:
            # commit the parts already complete (also when stopping); drop the incomplete ones
            try:
                await asyncio.shield(loop.run_in_executor(None, writer.close))
            except asyncio.CancelledError:
                writer.close()
            finally:
                stats.images, stats.failed = router.images, router.failed
                stats.records = list(writer.records)
                stats.parts_written = len(writer.records)
                stats.writer_s = writer.busy_s
                stats.wall_s = time.monotonic() - t0

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
            self.pixel_cache = self.source.stats()
            self.source = None
        if self.cache is not None:
            from engine.evaluate import close_pixel_cache

            close_pixel_cache(self.cache)
            self.cache = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.loop is not None:
            self.loop.close()
            self.loop = None
        self.backend.unregister_host_memory()
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        self.backend.close()


def score_local(job: Job) -> Tuple[ScoreStats, Dict, Optional[int]]:
    """Score the job's pending parts in this process. Returns (stats, backend description, signal)."""
    from engine.report.output import Progress

    scorer = PartScorer(job.cfg, job.manifest, job.out, job.meta, job.opts.topk, job.opts.part_size)
    try:
        scorer.open()
        progress = Progress(job.pending_images(), job.cfg.progress)
        stats = scorer.score(job.pending, progress, handle_signals=True)
        progress.close()
        info, stop = scorer.describe(), scorer.stop_signal
    finally:
        scorer.close()
    stats.pixel_cache = scorer.pixel_cache
    return stats, info, stop

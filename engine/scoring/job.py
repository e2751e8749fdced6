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
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from engine import __version__
from engine.classes import imagenet_classes
from engine.errors import UsageError
from engine.config import RunConfig
from engine.files import file_sha256
from engine.scoring.manifest import MANIFEST_FILE, Manifest, build_manifest, resolve_shard, shard_parts
from engine.report.metrics import topk_indices
from engine.pipeline.scheduler import BatchResult, PipelineStats
from engine.scoring.writer import (RUN_FILE, OutputDir, OutputError, PartRows, PartWriter,
                           RowEncoder, create_once)

DEFAULT_PART_SIZE = 10000

# The run.json keys that decide the rows: a resume must match every one of them.
FINGERPRINT_KEYS = ("manifest_sha256", "manifest_images", "part_size", "format", "topk", "model", "weights_sha256",
                    "ts_sha256", "backend", "precision", "num_classes", "preprocessing", "max_image_pixels")


class OutputMismatchError(UsageError):
    """OUT holds another run (other manifest or configuration); the message lists the differences."""


MismatchError = OutputMismatchError  # its name before export's own mismatch got one of its own


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


def run_metadata(cfg: RunConfig, opts: ScoreOptions, manifest: Manifest, labelled: bool = False) -> Dict:
    """run.json: the fingerprint (FINGERPRINT_KEYS) plus what is useful to know about the run."""
    weights_sha = file_sha256(cfg.model.weights) if cfg.model.weights and os.path.isfile(cfg.model.weights) else None
    if cfg.model.weights and weights_sha is None and not cfg.model.ts:  # a weights tag counts by its file's sha256
        from engine.models.zoo import weights_sha256

        weights_sha = weights_sha256(cfg.model.name, cfg.model.weights)
    ts_sha = file_sha256(cfg.model.ts) if cfg.model.ts and os.path.isfile(cfg.model.ts) else None
    meta = {
        "manifest_sha256": manifest.sha256, "manifest_images": len(manifest), "part_size": opts.part_size,
        "format": opts.fmt, "topk": min(opts.topk, cfg.data.num_classes), "model": cfg.model.name,
        "weights_sha256": weights_sha, "ts_sha256": ts_sha, "backend": cfg.backend.name,
        "precision": cfg.backend.precision, "num_classes": cfg.data.num_classes,
        "preprocessing": dataclasses.asdict(cfg.preprocess),
        "max_image_pixels": cfg.pipeline.max_image_pixels,  # which huge images fail
        # not compared on resume:
        "engine": "imagenet-engine", "engine_version": __version__, "weights": cfg.model.weights, "ts": cfg.model.ts,
        "data_root": manifest.root, "parts": manifest.num_parts(opts.part_size),
        "columns": ["id", "path", "topk_index", "topk_prob", "top1_wnid", "top1_name", "error"]
        + (["label"] if labelled else []),
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
    labels: Optional[np.ndarray] = None  # by manifest id, for the rows' label column; None: no such column

    def pending_images(self) -> int:
        return sum(self.part_size_of(p) for p in self.pending)

    def part_size_of(self, part: int) -> int:
        lo, hi = self.manifest.part_range(part, self.opts.part_size)
        return hi - lo


def open_output(cfg: RunConfig, opts: ScoreOptions, manifest: Manifest, labelled: bool = False
                ) -> Tuple[OutputDir, Dict]:
    """Create OUT with manifest.tsv and run.json, or check that they match this run (resume). A
    folder whose rows have no label column (written before they had one) resumes without it, so
    its parts stay alike; `run-score --summarize` says what it lacks."""
    meta = run_metadata(cfg, opts, manifest, labelled)
    out = OutputDir(opts.out, manifest.num_parts(opts.part_size), opts.fmt)
    try:
        os.makedirs(out.path, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {opts.out}: cannot create the folder ({e.strerror or e})")
    run_path = out.file(RUN_FILE)
    if os.path.exists(run_path):
        if not opts.resume:
            raise OutputMismatchError(f"--out {opts.out} already holds a scoring run ({RUN_FILE}); run without "
                                "--no-resume to resume it, or give a new --out")
        old = _read_json(run_path)
        if "label" not in old.get("columns", []):
            meta["columns"] = [c for c in meta["columns"] if c != "label"]
        diff = _differences(old, meta)
        if diff:
            raise OutputMismatchError(
                f"--out {opts.out} holds a run with another manifest or configuration, refusing to mix them:\n  "
                + "\n  ".join(diff)
                + "\nresume with the same --data and options, or give a new --out")
    manifest_path = out.file(MANIFEST_FILE)
    if not create_once(manifest_path, manifest.text().encode("utf-8", "surrogateescape")):
        sha = _header_sha(manifest_path)
        if sha != manifest.sha256:
            raise OutputMismatchError(
                f"--out {opts.out} holds the manifest of other images ({MANIFEST_FILE} sha256 {str(sha)[:12]}..., "
                f"this --data gives {len(manifest):,} images, sha256 {manifest.sha256[:12]}...: files added, "
                "removed or resized); give a new --out, or the --data it was made from")
    if not create_once(run_path, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode()):
        diff = _differences(_read_json(run_path), meta)  # another shard created it meanwhile
        if diff:
            raise OutputMismatchError(f"--out {opts.out}: another process started a different run there:\n  "
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
    from engine.scoring.summary import manifest_labels

    if not cfg.data.path:
        raise UsageError("--data is required: a folder, or a text file with one image path per line")
    manifest = build_manifest(cfg.data.path, cfg.data.limit)
    labels = manifest_labels(cfg.data.path, manifest)
    out, meta = open_output(cfg, opts, manifest, labels is not None)
    if "label" not in meta["columns"]:
        labels = None
    i, n, source = resolve_shard(opts.shard, environ)
    parts = shard_parts(out.num_parts, i, n)
    done = out.done_records(parts)
    pending = [p for p in parts if p not in done]
    out.remove_stale(pending)
    return Job(cfg, opts, manifest, meta, out, (i, n), source, parts, done, pending, labels)


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

    def __init__(self, manifest: Manifest, part_size: int, k: int, writer: PartWriter,
                 labels: Optional[np.ndarray] = None):
        self.manifest, self.part_size, self.k, self.writer = manifest, part_size, k, writer
        self.labels = labels  # by manifest id (-1: none); None: the rows have no label column
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
        groups: List[Tuple[int, Any]]  # (part, its rows: a slice or an index array)
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
                labels = None if self.labels is None else self.labels[buf.lo:buf.lo + buf.n]
                self.writer.submit(PartRows(p, buf.lo, self.manifest.paths[buf.lo:buf.lo + buf.n],
                                            buf.idx, buf.prob, buf.errors, labels))
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
    """Whole parts scored into OUT through a Session (engine/pipeline/session.py: ring, worker pool,
    backend, pixel cache), in this process or in a Ray actor.

    `open()` once, `score(parts)` any number of times (a Ray actor scores part after part with
    the same pool and model), `close()` once.
    """

    def __init__(self, cfg: RunConfig, manifest: Manifest, out: OutputDir, meta: Dict, topk: int, part_size: int,
                 labels: Optional[np.ndarray] = None):
        from engine.pipeline.session import Session

        self.manifest, self.out, self.meta, self.labels = manifest, out, meta, labels
        self.k, self.part_size = min(topk, cfg.data.num_classes), part_size
        self.session = Session(cfg, manifest.dataset())
        classes = imagenet_classes() if cfg.data.num_classes == 1000 else None
        parquet_meta = {
            "model": meta["model"], "weights_sha256": meta.get("weights_sha256") or "",
            "preprocessing": meta["preprocessing"], "engine_version": __version__,
            "manifest_sha256": meta["manifest_sha256"], "imagenet_engine": meta,
        }
        self.encoder = RowEncoder(out.fmt, classes, parquet_meta)
        self.pixel_cache: Optional[Dict] = None  # --pixel-cache: its report object, once closed
        self.stop_signal: Optional[int] = None

    @property
    def cfg(self) -> RunConfig:
        return self.session.cfg

    def open(self) -> None:
        s = self.session.open()
        # one model call on a resident batch, so the first parts do not pay the device's warm-up
        # (lazy initialisation, cuDNN autotuning); run-eval gets the same from its compute-only run
        s.backend.compute_only(s.cfg.pipeline.batch_size, 1, warmup=0)
        if s.cache is None:
            s.start()  # the workers; fed by the pixel cache, they start only if something must be decoded

    def describe(self) -> Dict:
        return self.session.describe()

    def score(self, parts: Sequence[int], progress: Optional[Callable[[int, float], None]] = None,
              handle_signals: bool = False) -> ScoreStats:
        """Score and commit these parts. Raises the writer's error (disk full) or the pool's."""
        stats = ScoreStats()
        self.session.handle_signals = handle_signals
        try:
            self.session.until_done(self._score(list(parts), stats, progress))
        finally:
            self.session.handle_signals = False
        self.stop_signal = self.session.stopped
        return stats

    async def _score(self, parts: List[int], stats: ScoreStats, progress) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_error(e: BaseException) -> None:  # in the writer thread: stop the pipeline now
            loop.call_soon_threadsafe(task.cancel)

        writer = PartWriter(self.out, self.encoder, on_error, extra={"engine_version": __version__})
        router = PartRouter(self.manifest, self.part_size, self.k, writer, self.labels)
        t0 = time.monotonic()
        n = len(self.manifest)

        def prog(done: int, elapsed: float) -> None:
            if progress is not None:
                progress(base + done, time.monotonic() - t0)

        try:
            base = 0
            for first, end in contiguous_runs(parts):
                lo = self.manifest.part_range(first, self.part_size)[0]
                hi = min(n, end * self.part_size)
                await self.session.pipeline(lo, hi, router.reduce, prog, stats=stats.pipeline)
                base += hi - lo
            await self.session.finish()
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
        self.session.close()
        self.pixel_cache = self.session.pixel_cache


def score_local(job: Job) -> Tuple[ScoreStats, Dict, Optional[int]]:
    """Score the job's pending parts in this process. Returns (stats, backend description, signal)."""
    from engine.report.output import Progress

    scorer = PartScorer(job.cfg, job.manifest, job.out, job.meta, job.opts.topk, job.opts.part_size, job.labels)
    try:
        scorer.open()
        progress = Progress(job.pending_images(), job.cfg.pipeline.progress)
        stats = scorer.score(job.pending, progress, handle_signals=True)
        progress.close()
        info, stop = scorer.describe(), scorer.stop_signal
    finally:
        scorer.close()
    stats.pixel_cache = scorer.pixel_cache
    return stats, info, stop

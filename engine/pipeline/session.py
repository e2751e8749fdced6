"""The Session: one object that owns a run's resources and closes them in one order.

    Session(cfg).open()      dataset, pixel cache, event loop, backend (or the device processes
                             of --devices), autotune, ring, decode pool, source
    .compute_only()          the model alone on a resident batch (before the run's clock starts)
    .run(lo, hi, reduce)     score dataset images [lo, hi) through the pipeline; `reduce` gets
                             each finished batch (engine/pipeline/scheduler.py BatchResult)
    .fill(windows)           decode-only (make-cache): the source's batches, no device
    .close()                 source -> pixel cache -> pool -> loop -> host memory -> ring -> backend

Every command (run-eval, run-score, make-cache, run-bench --e2e), the benchmarks and the tests are
short drivers over it; it is the public API (`engine.Session`). A library Session installs no
signal handlers; the commands ask for them (`handle_signals=True`): the first SIGINT/SIGTERM stops
the run with a partial result (`stopped` says which signal), the second exits at once.

    with Session(cfg) as s:
        s.compute_only()
        stats = s.run(0, len(s.dataset), reduce=lambda r: ...)
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

from engine.config import RunConfig
from engine.pipeline.dataset import Dataset, build_dataset
from engine.pipeline.pool import WorkerPool
from engine.pipeline.ring import Ring
from engine.pipeline.scheduler import BatchResult, PipelineStats, loop_name, new_event_loop, run_pipeline
from engine.pipeline.signals import StopSignals
from engine.pipeline.sources import Source

if TYPE_CHECKING:  # the pixel cache is imported only by a run that has one
    from engine.pipeline.pixelcache import PixelCache


def measure_compute_only(backend, batch_size: int, iterations: int = 0, budget_s: float = 2.0) -> List[float]:
    """Latencies of the model alone on a resident batch; with iterations=0, about `budget_s` worth."""
    if iterations:
        return backend.compute_only(batch_size, iterations, warmup=2)
    # the probe is a second warm-up (allocators, autotuners settle over the first calls); at least
    # 3 timed calls even for a slow model, so one noisy call cannot make the figure
    probe = backend.compute_only(batch_size, 1, warmup=1)
    n = int(max(3, min(200, budget_s / max(probe[0], 1e-6))))
    return backend.compute_only(batch_size, n, warmup=0)


class Session:
    """A run's resources: see the module's docstring.

    `cfg`: the run's configuration (`batch_size`/`workers` 0: auto, resolved in `open()`).
    `dataset`: an index to use instead of building one from `cfg.data.path`.
    `device`: False for a decode-only session (make-cache): no backend, no model.
    `backend`: a backend object to use instead of creating one (benchmarks, tests).
    `handle_signals`: install the stop handlers while a run is going (commands only).
    `ring_slots`: ring slots instead of the configuration's (make-cache sizes it for its workers).
    `cache_write`: False to only read the pixel cache (`cfg.pipeline.pixel_cache`), never store into it.
    `loop_kind`: "auto" (uvloop where installed), "uvloop" or "asyncio".
    """

    def __init__(self, cfg: RunConfig, dataset: Optional[Dataset] = None, *, device: bool = True,
                 backend=None, handle_signals: bool = False, ring_slots: int = 0, cache_write: bool = True,
                 loop_kind: str = "auto", log=None):
        self.cfg = cfg
        self.dataset = dataset
        self.device = device
        self.backend = backend
        self.handle_signals = handle_signals
        self.ring_slots = ring_slots
        self.log = log if log is not None else sys.stderr
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.ring: Optional[Ring] = None
        self.pool: Optional[WorkerPool] = None
        self.source: Optional[Source] = None
        self.cache: Optional[PixelCache] = None
        self.cache_write = cache_write
        self.loop_kind = loop_kind
        self.autotune: Dict = {}
        self.stopped: Optional[int] = None  # the signal that stopped a run
        self.backend_info: Optional[Dict] = None  # the backend's description, kept at close
        self.pixel_cache: Optional[Dict] = None  # the cache's report object, kept at close
        self._pool_started = False
        self._opened = False

    # -- opening -----------------------------------------------------------------------------
    def open(self) -> "Session":
        """Build what the run needs, in order; on an error, close what was built and raise. With
        signal handling, a SIGINT/SIGTERM while opening (loading or compiling the model, starting
        device processes) closes what was built and leaves `stopped` set: nothing more runs."""
        if self._opened:
            return self
        self._opened = True
        previous = {}
        if self.handle_signals:
            previous = {sig: signal.signal(sig, _stop_opening) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._open()
        except _StoppedOpening as e:
            self.stopped = e.signum
            print(f"\n{signal.Signals(e.signum).name}: stopped before the run started", file=self.log)
            self.close()
        except BaseException:
            self.close()
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self

    def _open(self) -> None:
        cfg = self.cfg
        if self.dataset is None:
            self.dataset = build_dataset(cfg.data.path, cfg.data.labels, cfg.data.limit, cfg.data.num_classes)
        self.cache, writable = open_pixel_cache(cfg, self.dataset, self.log)
        self.cache_write = self.cache_write and writable
        self.loop = new_event_loop(self.loop_kind)
        if self.device:
            if self.backend is None:
                self.backend = create_backend(cfg)
                check_backend(cfg, self.backend)  # --decode device: before the model loads
                self.cfg = cfg = cfg.replace(backend=self.backend.name)
                if cfg.pipeline.workers == 0 or cfg.pipeline.batch_size == 0:  # --workers auto, --batch-size auto
                    from engine.pipeline.autotune import autotune

                    auto_reason = self.backend.auto_reason
                    self.cfg, self.backend, self.autotune = autotune(cfg, self.dataset, self.backend, log=self.log,
                                                                     create_backend=create_backend)
                    self.backend.auto_reason = auto_reason
                    cfg = self.cfg
                else:
                    self.backend.prepare(cfg.pipeline.batch_size)
            elif not self.backend.batch_size:
                self.backend.prepare(cfg.pipeline.batch_size)
        devices = self.backend.device_count if self.backend is not None else 1
        self.ring = make_ring(cfg, slots=self.ring_slots or cfg.pipeline.slots_for(devices))  # (+ arena: --decode device)
        if self.backend is not None:
            self.backend.register_ring(self.ring)
            if self.cache is not None:
                self.backend.register_pixel_cache(self.cache)
        self.pool = WorkerPool(self.ring, self.dataset, cfg.preprocess, cfg.pipeline.workers,
                               image_timeout=cfg.pipeline.image_timeout, max_image_pixels=cfg.pipeline.max_image_pixels)
        self.source = self._make_source()

    def _make_source(self):
        from engine.pipeline.sources import CacheSource

        cfg = self.cfg
        if self.cache is not None:  # the workers start only if something must be decoded
            return CacheSource(self.cache, self.dataset, self.pool, self.ring, self.pad_to,
                               ahead=self.ring.slots, write=self.cache_write, log=self.log)
        return make_source(self.pool, self.ring, self.backend, cfg, self.pad_to)  # the pool: pixels or bytes

    @property
    def pad_to(self) -> int:
        """Rows every batch is padded to: the batch size for a static-shape backend, else 0."""
        return self.cfg.pipeline.batch_size if self.backend is not None and self.backend.static_shape else 0

    # -- running -----------------------------------------------------------------------------
    async def _start(self, lo: int, hi: int) -> None:
        from engine.pipeline.sources import CacheSource

        if isinstance(self.source, CacheSource):
            await self.source.start(lo, hi)
        elif not self._pool_started:
            assert self.pool is not None, "open() the session first"
            await self.pool.start()
            self._pool_started = True

    def start(self, lo: int = 0, hi: Optional[int] = None) -> None:
        """Get the source ready for images [lo, hi): the decode workers up (or, fed by the pixel
        cache, only if something must be decoded). `run` does it too; call it first to keep worker
        start-up out of a measurement (compute-only is measured while the workers are idle)."""
        assert self.dataset is not None, "open() the session first"
        self.until_done(self._start(lo, len(self.dataset) if hi is None else hi))

    def compute_only(self, iterations: int = 0, batch_size: int = 0) -> List[float]:
        """Latencies (s) of the model alone on a batch already on the device (an empty list when a
        signal stopped it). Runs in an executor thread, so the stop signals work meanwhile."""

        batch = batch_size or self.cfg.pipeline.batch_size

        async def body():
            loop = asyncio.get_running_loop()
            lat = await loop.run_in_executor(None, measure_compute_only, self.backend, batch, iterations)
            if self.backend.device_count > 1:  # --devices: each device alone too
                await loop.run_in_executor(None, self.backend.compute_only_alone, batch,
                                           iterations or max(3, len(lat) // 2))
            return lat

        return self.until_done(body()) or []

    async def pipeline(self, lo: int, hi: int, reduce: Callable[[BatchResult], None],
                       progress: Optional[Callable[[int, float], None]] = None,
                       stats: Optional[PipelineStats] = None) -> PipelineStats:
        """On the session's loop: score dataset images [lo, hi) (see `run`), without the source's
        `finish` (a driver that runs several ranges, like run-score's parts, awaits `finish()` once)."""
        stats = stats if stats is not None else PipelineStats()
        await self._start(lo, hi)
        assert self.source is not None, "open() the session first"
        await run_pipeline(self.source, self.backend, hi, self.cfg.pipeline.batch_size, self._inflight(), reduce,
                           progress, start=lo, stats=stats)
        return stats

    async def finish(self) -> None:
        """On the session's loop: wait for the source's own remaining work (the cache's writes and flush)."""
        assert self.source is not None, "open() the session first"
        await self.source.finish()

    def run(self, lo: int, hi: int, reduce: Callable[[BatchResult], None],
            progress: Optional[Callable[[int, float], None]] = None,
            stats: Optional[PipelineStats] = None) -> PipelineStats:
        """Score dataset images [lo, hi); `reduce` gets every finished batch exactly once. Returns
        the pipeline's figures (valid also when a signal stopped the run: see `stopped`)."""
        stats = stats if stats is not None else PipelineStats()

        async def body():
            await self.pipeline(lo, hi, reduce, progress, stats)
            await self.finish()

        self.until_done(body())
        return stats

    def fill(self, windows: Sequence[Tuple[int, int]], progress: Optional[Callable[[int, float], None]] = None) -> None:
        """Decode only (no device): ask the source for each [lo, hi) window as a batch and release it
        once filled (the pixel cache's write-through stores it first). make-cache's loop."""

        async def body():
            futures = []
            done = [0]
            t0 = time.monotonic()

            def finished(f: "asyncio.Future") -> None:
                if f.cancelled() or f.exception() is not None:
                    return
                batch = f.result()
                batch.release()  # after the cache's write of it (CacheSource holds the slot until then)
                done[0] += batch.n
                if progress is not None:
                    progress(done[0], time.monotonic() - t0)

            if windows:
                await self._start(windows[0][0], windows[-1][1])
            for b, (lo, hi) in enumerate(windows):
                fut = await self.source.fill(b, lo, hi - lo)
                fut.add_done_callback(finished)
                futures.append(fut)
            try:
                await asyncio.gather(*futures)
            finally:
                for f in futures:
                    f.cancel()
            await self.source.finish()

        self.until_done(body())

    def _inflight(self) -> int:
        """Batches on the device(s) at once: `--inflight` per device."""
        return self.cfg.pipeline.inflight * max(1, self.backend.device_count if self.backend is not None else 1)

    def until_done(self, coro):
        """Run `coro` on the session's loop and return its result; with signal handling, a first
        SIGINT/SIGTERM cancels it (recorded in `stopped`, None returned) and a second exits at once.
        Once stopped, nothing more runs."""
        assert self.loop is not None, "open() the session first"
        if self.stopped is not None:
            coro.close()
            return None
        task = self.loop.create_task(coro)
        if not self.handle_signals:
            return self.loop.run_until_complete(task)
        signals = StopSignals(self.loop, task, self.ring, on_stop=self._stopping)
        try:
            return self.loop.run_until_complete(task)
        except asyncio.CancelledError:
            if signals.signum is None:
                raise
            self.stopped = signals.signum
            return None
        finally:
            signals.remove()

    def _stopping(self) -> None:
        if self.pool is not None:
            self.pool.stopping()
        if self.backend is not None:
            self.backend.stopping()

    # -- what ran ----------------------------------------------------------------------------
    @property
    def loop_name(self) -> str:
        return loop_name(self.loop) if self.loop is not None else "asyncio"

    def describe(self) -> Dict:
        """The backend's description (what ran), with why `--backend auto` chose it."""
        if self.backend_info is not None:
            return self.backend_info
        if self.backend is None:
            return {"backend": self.cfg.backend.name}
        info = self.backend.describe()
        if self.backend.auto_reason:
            info["auto"] = self.backend.auto_reason
        return info

    # -- closing -----------------------------------------------------------------------------
    def close(self) -> None:
        """Close everything in one order; safe to call twice, and after a failed `open()`.
        The source stops first (its threads may be writing to the cache), then the cache's last
        flush, the workers, the loop, the backend's hold on the ring's memory, the ring (unlinked),
        and last the backend (its description is kept in `backend_info` first)."""
        from engine.pipeline.sources import CacheSource

        if self.source is not None:
            if isinstance(self.source, CacheSource):
                self.source.close()
                self.pixel_cache = self.source.stats()
            self.source = None
        if self.cache is not None:
            if self.pixel_cache is None:
                self.pixel_cache = dict(self.cache.stats())
            close_pixel_cache(self.cache, self.log)
            self.cache = None
        if self.pool is not None:
            self.pool.close()
        if self.loop is not None:
            self.loop.close()
        if self.backend is not None:
            self.backend.unregister_host_memory()
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.backend is not None:
            if self.backend_info is None:
                self.backend_info = self.describe()  # before close(): it says what ran
            self.backend.close()

    def __enter__(self) -> "Session":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


class _StoppedOpening(BaseException):
    """A stop signal while the Session opens (a BaseException, so no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_opening(signum, frame) -> None:
    raise _StoppedOpening(signum)


def make_ring(cfg: RunConfig, batch_size: int = 0, slots: int = 0):
    """The run's ring: `cfg.pipeline.slots` slots of the batch size; with a byte arena of `--decode-arena-kib`
    per image for `--decode device`."""
    from engine.pipeline.ring import Ring

    batch = batch_size or cfg.pipeline.batch_size
    arena = cfg.device_decode.arena_kib * 1024 * batch if cfg.preprocess.decode == "device" else 0
    return Ring(slots or cfg.pipeline.slots, batch, cfg.preprocess.shape, arena=arena)


def check_backend(cfg: RunConfig, backend) -> None:
    """Refuse `--decode device` at once (before the model loads) on a backend that cannot decode
    JPEGs (its declared `decodes_jpeg`)."""
    if cfg.preprocess.decode == "device" and not backend.decodes_jpeg:
        from engine.backends.base import BackendError

        raise BackendError(f"--decode device needs --backend cuda (the GPU decodes the JPEGs), not {backend.name}")


def make_source(pool, ring, backend, cfg: RunConfig, pad_to: int = 0):
    """The decode pool's source: `PoolSource` (pixels), or for `--decode device` the source whose
    batches carry compressed bytes (engine/pipeline/encoded.py, imported only then)."""
    from engine.pipeline.sources import PoolSource

    if cfg.preprocess.decode != "device":
        return PoolSource(pool, ring, pad_to)
    from engine.pipeline.encoded import device_decode_source

    check_backend(cfg, backend)
    return device_decode_source(pool, ring, backend, cfg, pad_to)


def create_backend(cfg: RunConfig):
    """The run's backend: the device processes of `--devices`, else one backend in this process."""
    if cfg.backend.devices:
        from engine.pipeline.devices import DeviceGroup

        return DeviceGroup(cfg)
    from engine.backends import create_backend

    return create_backend(cfg)


def open_pixel_cache(cfg: RunConfig, ds: Dataset, log=None):
    """The `--pixel-cache` of a run, or (None, False); else (cache, write). The cache opens
    read-only (`write` False, one line says why) when another run holds its write lock or the
    images it lacks do not fit on its disk: the run then reads what is there and decodes the rest."""
    if not cfg.pipeline.pixel_cache:
        return None, False
    from engine.pipeline.pixelcache import PixelCache

    cache = PixelCache.open(cfg.pipeline.pixel_cache, ds, cfg.preprocess, cfg.pipeline.max_image_pixels, verify=cfg.pipeline.cache_verify,
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


__all__ = ["Session", "close_pixel_cache", "measure_compute_only", "open_pixel_cache"]

"""Sources of filled batches: where the scheduler's pixels come from.

The scheduler (engine/pipeline/scheduler.py) asks a source for batch b = dataset images
[start, start + n) and gets back, when it is ready, a `Batch`: a uint8 NHWC view the backend copies
from, the per-image labels, indices and status, and a `release()` to call once the copy to the
device has finished (NOTE [Slot ownership and shutdown] in engine/pipeline/ring.py). The device
does not care where the pixels came from, so the scheduler has no `if cache / if pool` branches:

    PoolSource     decode workers fill shared-memory ring slots (engine/pipeline/pool.py)
    CacheSource    the pixel cache (engine/pipeline/pixelcache.py): a batch whose images are all
                   in the cache is a slice of its memory-mapped file, checked by checksum, no copy;
                   a batch with images missing goes to the decode pool (write-through): the hit
                   rows are copied into a ring slot, the workers decode only the missing rows,
                   and what they decoded (pixels, or the failure and its reason) is stored in the
                   cache before the slot is free again. Workers start at the first such batch.

A source bounds how many batches are outstanding (filled or being filled, not yet released) by
itself: `fill()` waits for room before it starts a batch. `start()` prepares it (the decode pool
where it will be needed) and `finish()` waits for what it still does after the last batch (the
cache's writes); both are no-ops for the pool alone.
"""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from engine.pipeline.pool import Fill, WorkerPool
from engine.pipeline.ring import FAILED, OK, Ring


def _noop() -> None:
    pass


@dataclass
class Batch:
    """A filled batch as the scheduler sees it. `pixels` may point into shared memory or a mapped
    file: it is valid until `release()`; the small per-image arrays are the batch's own copies."""

    batch_no: int
    start: int
    n: int
    pixels: np.ndarray  # uint8 [rows, H, W, 3], rows = n, or the padded batch size for static shapes
    indices: np.ndarray  # int64 [n], dataset indices
    labels: np.ndarray  # int64 [n]
    ok: np.ndarray  # bool [n]: pixels are valid (decoded or read) and the image is scored
    failures: List[Tuple[int, str]] = field(default_factory=list)  # (row, reason)
    decode_s: float = 0.0  # summed per-image decode time (workers' clocks); 0 for read pixels
    submitted: float = 0.0  # when the source started the batch (time.monotonic)
    done_at: float = 0.0  # when it was ready
    slot: int = -1  # the ring slot, where there is one (trace and tests)
    release: Callable[[], None] = _noop


class Source:
    """Filled batches for the scheduler. `fill()` is called in batch order, waits for room, starts
    the batch and returns a future that resolves to its `Batch` (or raises the source's error)."""

    async def fill(self, batch_no: int, start: int, n: int) -> "asyncio.Future[Batch]":
        raise NotImplementedError

    async def start(self, lo: int, hi: int) -> None:
        """Get ready to deliver images [lo, hi) (before the run's clock starts)."""

    async def finish(self) -> None:
        """After the last batch was released: wait for the source's own remaining work."""


class PoolSource(Source):
    """The decode pool: each batch is decoded by the workers into a free ring slot; the slot is
    free again when the batch is released (its copy to the device has finished)."""

    def __init__(self, pool: WorkerPool, ring: Ring, pad_to: int = 0):
        self.pool, self.ring, self.pad_to = pool, ring, pad_to
        self._free: "Optional[asyncio.Queue[int]]" = None  # made on the running loop (Python 3.9)

    async def fill(self, batch_no: int, start: int, n: int) -> "asyncio.Future[Batch]":
        if self._free is None:
            self._free = asyncio.Queue()
            for k in range(self.ring.slots):
                self._free.put_nowait(k)
        slot = await self._free.get()
        try:
            filling = self.pool.fill(slot, batch_no, start, n)
        except BaseException:
            self._free.put_nowait(slot)
            raise
        out = asyncio.get_running_loop().create_future()

        def done(f: "asyncio.Future[Fill]") -> None:
            if out.done():
                return
            if f.cancelled():
                out.cancel()
            elif (error := f.exception()) is not None:
                out.set_exception(error)
                out.exception()  # the scheduler raises the first one; the rest must not be logged at exit
            else:
                out.set_result(self.batch_of(f.result()))

        filling.add_done_callback(done)
        return out

    def batch_of(self, f: Fill) -> Batch:
        ring, slot, n = self.ring, f.slot, f.n
        rows = max(n, self.pad_to)
        return Batch(f.batch_no, f.start, n, ring.pixels(slot)[:rows],
                     ring.indices[slot, :n].copy(), ring.labels[slot, :n].copy(),
                     ring.status[slot, :n] == OK, list(f.failures),
                     float(ring.decode_ns[slot, :n].sum()) / 1e9, f.submitted, f.done_at, slot,
                     release=lambda: self._release(slot))

    def _release(self, slot: int) -> None:
        assert self._free is not None
        self._free.put_nowait(slot)


def _runs(rows: np.ndarray) -> List[Tuple[int, int]]:
    """[(a, b)] half-open runs of consecutive values in sorted `rows`."""
    if len(rows) == 0:
        return []
    breaks = np.nonzero(np.diff(rows) != 1)[0]
    starts = np.concatenate(([0], breaks + 1))
    ends = np.concatenate((breaks + 1, [len(rows)]))
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, ends)]


class CacheSource(Source):
    """The pixel cache first, the decode pool (write-through) for what it lacks.

    `cache`: an open `PixelCache` over `dataset`; `pool` is started here only when a batch has an
    image that must be decoded. `write`: store what the pool decodes (False: a reader, as when
    another run holds the cache's write lock). `ahead`: batches outstanding at once (read and
    checked ahead of the device). The pool's batches also need a free ring slot.
    """

    def __init__(self, cache, dataset, pool: WorkerPool, ring: Ring, pad_to: int = 0, ahead: int = 4,
                 write: bool = True, check_threads: int = 2, spare: int = 2, log=None):
        from engine.pipeline import pixelcache

        self.pc = pixelcache
        self.cache, self.dataset, self.pool, self.ring, self.pad_to = cache, dataset, pool, ring, pad_to
        self.ahead = max(1, ahead)
        self.write = bool(write) and bool(getattr(cache, "writable", False))
        self.log = log if log is not None else sys.stderr
        self.decoded = 0  # images the workers decoded for this source
        self.read_batches = 0  # batches served straight from the cache (no copy)
        self.write_error: Optional[str] = None  # why writing stopped (the disk is full ...)
        self.slot_wait_s = 0.0  # ring slots held after their copy, waiting for their write to the cache
        self.spare = spare  # buffers the decoded rows wait in for the writer, so that slots are free at once
        self._spare: List[np.ndarray] = []
        self._spares_made = 0
        self._room: Optional[asyncio.Semaphore] = None
        self._free: "Optional[asyncio.Queue[int]]" = None
        self._pool_started: "Optional[asyncio.Future]" = None
        self._checker = ThreadPoolExecutor(max_workers=max(1, check_threads), thread_name_prefix="cache-check")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-write")
        self._writes: "set[asyncio.Future]" = set()
        self._tasks: "set[asyncio.Task]" = set()

    # -- set-up ------------------------------------------------------------------------------
    def _init_loop_state(self) -> None:
        if self._room is None:  # made on the running loop (Python 3.9)
            self._room = asyncio.Semaphore(self.ahead)
            self._free = asyncio.Queue()
            for k in range(self.ring.slots):
                self._free.put_nowait(k)

    def missing(self, lo: int, hi: int) -> int:
        """Images in [lo, hi) the cache does not hold (as far as it knows before checksums)."""
        return int(np.count_nonzero(self.cache.state[lo:hi] == self.pc.MISS))

    async def start(self, lo: int, hi: int) -> None:
        self._init_loop_state()
        if self.missing(lo, hi):
            await self._start_pool()  # known now: start the workers before the clock runs

    async def _start_pool(self) -> None:
        if self._pool_started is None:
            self._pool_started = asyncio.ensure_future(self.pool.start())
        await asyncio.shield(self._pool_started)

    @property
    def workers_started(self) -> bool:
        return self._pool_started is not None

    # -- batches -----------------------------------------------------------------------------
    async def fill(self, batch_no: int, start: int, n: int) -> "asyncio.Future[Batch]":
        self._init_loop_state()
        assert self._room is not None
        await self._room.acquire()
        task = asyncio.ensure_future(self._batch(batch_no, start, n))
        self._tasks.add(task)
        task.add_done_callback(self._batch_done)
        return task

    def _batch_done(self, task: "asyncio.Task") -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # the scheduler raises the first error; the others must not be logged again

    async def _batch(self, batch_no: int, start: int, n: int) -> Batch:
        assert self._room is not None
        submitted = time.monotonic()
        handed = False
        try:
            loop = asyncio.get_running_loop()
            lo, hi = start, start + n
            state = self.cache.state
            if np.any(state[lo:hi] != self.pc.MISS):
                # read the hit rows' checksums off the loop thread; a bad row becomes a MISS
                ahead = min(len(self.dataset), hi + self.ahead * n)
                await loop.run_in_executor(self._checker, self._check, lo, hi, hi, ahead)
            rows = state[lo:hi]
            if np.any(rows == self.pc.MISS):
                batch = await self._decode(batch_no, start, n, rows.copy(), submitted)
            else:
                batch = self._read(batch_no, start, n, rows, submitted)
            handed = True
            return batch
        finally:
            if not handed:
                self._room.release()

    def _check(self, lo: int, hi: int, pre_lo: int, pre_hi: int) -> None:
        if pre_hi > pre_lo:
            self.cache.prefetch(pre_lo, pre_hi)
        self.cache.check(lo, hi)

    def _read(self, batch_no: int, start: int, n: int, rows: np.ndarray, submitted: float) -> Batch:
        """Every image of the batch is in the cache: the batch is a slice of the mapped file."""
        pixels = self.cache.rows(start, start + n)
        if self.pad_to > n:  # a static-shape backend's short last batch: the only copy
            padded = np.zeros((self.pad_to,) + tuple(pixels.shape[1:]), np.uint8)
            padded[:n] = pixels
            pixels = padded
        ok = rows == self.pc.HIT_OK
        failures = [(int(r), self.cache.reason(start + int(r))) for r in np.nonzero(~ok)[0]]
        self.read_batches += 1
        return Batch(batch_no, start, n, pixels, np.arange(start, start + n, dtype=np.int64),
                     np.asarray(self.dataset.labels[start:start + n], np.int64).copy(), ok, failures,
                     0.0, submitted, time.monotonic(), -1, release=self._release_room)

    async def _decode(self, batch_no: int, start: int, n: int, rows: np.ndarray, submitted: float) -> Batch:
        """Some images must be decoded: hit rows copied into a ring slot, the workers do the rest."""
        assert self._free is not None
        await self._start_pool()
        slot = await self._free.get()
        try:
            ring = self.ring
            missing = np.nonzero(rows == self.pc.MISS)[0]
            hits = np.nonzero(rows == self.pc.HIT_OK)[0]
            failed = np.nonzero(rows == self.pc.HIT_FAILED)[0]
            if len(hits):
                await asyncio.get_running_loop().run_in_executor(
                    self._checker, self._copy_hits, slot, start, _runs(hits))
            ring.status[slot, hits] = OK
            ring.status[slot, failed] = FAILED
            ring.decode_ns[slot, hits] = 0
            ring.decode_ns[slot, failed] = 0
            f = await self.pool.fill(slot, batch_no, start, n,
                                     rows=None if len(missing) == n else missing.tolist())
        except BaseException:
            self._free.put_nowait(slot)
            raise
        f.failures.extend((int(r), self.cache.reason(start + int(r))) for r in failed)
        f.failures.sort()
        f.submitted = submitted
        self.decoded += len(missing)
        stored = self._store(slot, start, n, f) if self.write else None
        pixels = ring.pixels(slot)[:max(n, self.pad_to)]
        return Batch(f.batch_no, f.start, n, pixels, ring.indices[slot, :n].copy(),
                     ring.labels[slot, :n].copy(), ring.status[slot, :n] == OK, list(f.failures),
                     float(ring.decode_ns[slot, :n].sum()) / 1e9, f.submitted, f.done_at, slot,
                     release=lambda: self._release_slot(slot, stored))

    def _copy_hits(self, slot: int, start: int, runs: List[Tuple[int, int]]) -> None:
        px = self.ring.pixels(slot)
        for a, b in runs:
            px[a:b] = self.cache.rows(start + a, start + b)

    # -- write-through ------------------------------------------------------------------------
    def _store(self, slot: int, start: int, n: int, f: Fill) -> "Optional[asyncio.Future]":
        """Put the decoded rows (pixels, or the failure and its reason) into the cache, in the
        writer thread. The cache stores only rows it lacks. Returns a future after which the slot
        may be reused: the rows are first copied into a spare buffer (up to `spare` of them) so that
        a write held up by the disk (a flush's fdatasync, dirty-page throttling) does not hold the
        ring; with no spare buffer free, the slot itself is held until its write is done."""
        reasons: Dict[int, str] = {int(r): reason for r, reason in f.failures}
        status = self.ring.status[slot, :n].copy()
        loop = asyncio.get_running_loop()
        if self._spare or self._spares_made < self.spare:
            if self._spare:
                buf = self._spare.pop()
            else:
                buf = np.empty((self.ring.batch,) + tuple(self.ring.shape), np.uint8)
                self._spares_made += 1
            copied = loop.run_in_executor(self._checker, np.copyto, buf[:n], self.ring.pixels(slot)[:n])
            write = asyncio.ensure_future(self._put_spare(copied, buf, start, n, status, reasons))
            self._writes.add(write)
            write.add_done_callback(self._written)
            return copied
        fut = loop.run_in_executor(self._writer, self._put, self.ring.pixels(slot)[:n], start, status, reasons)
        self._writes.add(fut)
        fut.add_done_callback(self._written)
        return fut

    async def _put_spare(self, copied: "asyncio.Future", buf: np.ndarray, start: int, n: int, status: np.ndarray,
                         reasons: Dict[int, str]) -> None:
        try:
            await copied
            await asyncio.get_running_loop().run_in_executor(self._writer, self._put, buf[:n], start, status, reasons)
        finally:
            self._spare.append(buf)

    def _put(self, pixels: np.ndarray, start: int, status: np.ndarray, reasons: Dict[int, str]) -> None:
        if not self.write:
            return
        try:
            self.cache.put(start, pixels, status, reasons)
        except BaseException:
            self.write = False  # now, in the writer thread: the writes queued behind this one are skipped
            raise

    def _written(self, fut: "asyncio.Future") -> None:
        self._writes.discard(fut)
        error = None if fut.cancelled() else fut.exception()
        if error is not None:
            self._stop_writing(error)

    def _stop_writing(self, e: BaseException) -> None:
        self.write = False
        if self.write_error is None:  # warn once
            self.write_error = str(e) or type(e).__name__
            what = "" if isinstance(e, self.pc.CacheFull) else f" ({type(e).__name__})"
            print(f"warning: pixel cache: stopped writing{what}: {self.write_error}; the run goes on "
                  "decoding, and the cache stays usable (what was stored is kept; a later run resumes)",
                  file=self.log)

    # -- release ------------------------------------------------------------------------------
    def _release_room(self) -> None:
        assert self._room is not None
        self._room.release()

    def _release_slot(self, slot: int, stored: "Optional[asyncio.Future]") -> None:
        assert self._free is not None
        free = self._free

        asked = time.monotonic()

        def give(_=None) -> None:
            self.slot_wait_s += time.monotonic() - asked
            free.put_nowait(slot)
            self._release_room()

        if stored is None or stored.done():
            give()
        else:
            stored.add_done_callback(give)

    async def finish(self) -> None:
        """Wait for the writes still running, then flush the cache (its completion record)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
        loop = asyncio.get_running_loop()
        if self.cache.writable:
            try:
                await loop.run_in_executor(self._writer, self.cache.flush)
            except self.pc.PixelCacheError as e:  # a full disk (CacheFull) or EIO at the last fdatasync
                self._stop_writing(e)

    def close(self) -> None:
        """Cancel batches still being read; stop the helper threads (waits for a running write)."""
        for t in list(self._tasks):
            t.cancel()
        self._checker.shutdown(wait=True)
        self._writer.shutdown(wait=True)

    def stats(self) -> Dict:
        """The cache's figures plus this source's: the `pixel_cache` object of a report."""
        out = dict(self.cache.stats())
        out.update(decoded=self.decoded, workers_started=self.workers_started, writing=self.write,
                   write_error=self.write_error, slot_wait_s=round(self.slot_wait_s, 3))
        return out

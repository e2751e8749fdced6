"""Sources of filled batches: where the scheduler's pixels come from.

The scheduler (engine/pipeline/scheduler.py) asks a source for batch b = dataset images
[start, start + n) and gets back, when it is ready, a `Batch`: a uint8 NHWC view the backend copies
from, the per-image labels, indices and status, and a `release()` to call once the copy to the
device has finished (NOTE [Slot ownership and shutdown] in engine/pipeline/ring.py). The device
does not care where the pixels came from, so the scheduler has no `if cache / if pool` branches:

    PoolSource     decode workers fill shared-memory ring slots (engine/pipeline/pool.py)

A source bounds how many batches are outstanding (filled or being filled, not yet released) by
itself: `fill()` waits for room before it starts a batch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np

from engine.pipeline.pool import Fill, WorkerPool
from engine.pipeline.ring import OK, Ring


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
            elif f.exception() is not None:
                out.set_exception(f.exception())
                out.exception()  # the run raises the error once; batches never awaited must not log it again
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

"""The asyncio pipeline: filled batches -> H2D copy -> model -> logits -> reduction.

    feeder:   source.fill(batch) (waits for room in the source)  (engine/pipeline/sources.py)
    consumer: await the next filled batch -> take an in-flight place -> device_batch()
    device_batch (several at once, at most `inflight`):
        submit (copy + model enqueued) -> await copied -> batch.release(): for the decode pool,
        its slot is FREE again (NOTE in engine/pipeline/ring.py)
        -> await result -> reduce (top-k, metrics or writer) on the loop thread

Every call that can block on the device runs in an executor thread, so the event loop only
ever waits on futures and file descriptors. Batches complete in any order; each batch is
reduced exactly once, whatever its order.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np

from engine.backends.base import Backend, DeviceLost
from engine.pipeline.sources import Batch, Source


@dataclass
class BatchResult:
    """A finished batch as the reducer sees it: host copies, nothing points into the ring."""

    batch_no: int
    start: int
    indices: np.ndarray  # dataset indices, [n]
    labels: np.ndarray  # [n]
    ok: np.ndarray  # bool [n]: decoded and scored
    logits: np.ndarray  # float32 [n, classes] (rows of failed images are meaningless)
    failures: list  # (row, reason)


@dataclass
class BatchTiming:
    batch_no: int
    images: int
    fill_submitted: float
    fill_done: float
    submitted: float
    copied: float
    done: float
    reduced: float


@dataclass
class PipelineStats:
    wall_s: float = 0.0
    images: int = 0
    wait_s: float = 0.0  # consumer waiting for a filled slot
    copy_s: float = 0.0
    compute_s: float = 0.0
    reduce_s: float = 0.0
    decode_s: float = 0.0  # sum of per-image decode times, from the workers' clocks
    redone_batches: int = 0  # batches decoded and submitted again after their device was lost
    batches: List[BatchTiming] = field(default_factory=list)


async def run_pipeline(source: Source, backend: Backend, n_images: int, batch_size: int,
                       inflight: int, reduce: Callable[[BatchResult], None],
                       progress: Optional[Callable[[int, float], None]] = None,
                       start: int = 0, stats: Optional[PipelineStats] = None) -> PipelineStats:
    """Score dataset images [start, n_images) in batches from `source`; `reduce` gets each finished
    batch. A static-shape backend needs the source to pad its batches to `batch_size` rows.

    `stats` (filled as batches finish) stays valid if the run is cancelled part-way.
    """
    loop = asyncio.get_running_loop()
    stats = stats if stats is not None else PipelineStats()
    num_batches = math.ceil((n_images - start) / batch_size)
    filled: "asyncio.Queue[asyncio.Future]" = asyncio.Queue()
    places = asyncio.Semaphore(inflight)
    executor = ThreadPoolExecutor(max_workers=inflight + 1, thread_name_prefix="device")
    t_start = time.monotonic()
    done_images = 0

    async def feeder():
        for b in range(num_batches):
            lo = start + b * batch_size
            fut = await source.fill(b, lo, min(batch_size, n_images - lo))
            fut.add_done_callback(filled.put_nowait)

    async def attempt(f: Batch):
        """Submit, wait for the copy (then the batch's memory goes back to its source), wait for
        the logits. Returns (logits, job, submitted, copied, done)."""
        try:
            stats.decode_s += f.decode_s
            t0 = time.monotonic()
            job = await loop.run_in_executor(executor, backend.submit_batch, f)
            await loop.run_in_executor(executor, job.copied)
            t1 = time.monotonic()
        finally:
            f.release()
        logits = await loop.run_in_executor(executor, job.result)
        return logits, job, t0, t1, time.monotonic()

    async def device_batch(f: Batch):
        nonlocal done_images
        n = f.n
        while True:
            try:
                logits, job, t0, t1, t2 = await attempt(f)
                break
            except DeviceLost:
                # its device process died after copying it (engine/pipeline/devices.py): decode the
                # batch again and give it to another device; it is reduced once, below
                stats.redone_batches += 1
                f = await (await source.fill(f.batch_no, f.start, n))
        ok, failures = f.ok, list(f.failures)
        late = job.failed_rows()  # images the backend itself failed to decode (--decode device)
        if late:
            ok = ok.copy()
            for row, reason in late:
                ok[row] = False
                failures.append((row, reason))
        reduce(BatchResult(f.batch_no, f.start, f.indices, f.labels, ok, logits[:n], failures))
        t3 = time.monotonic()
        stats.copy_s += t1 - t0
        stats.compute_s += t2 - t1
        stats.reduce_s += t3 - t2
        stats.batches.append(BatchTiming(f.batch_no, n, f.submitted, f.done_at, t0, t1, t2, t3))
        done_images += n
        stats.images = done_images
        if progress is not None:
            progress(done_images, time.monotonic() - t_start)

    async def consumer():
        running = set()
        try:
            for _ in range(num_batches):
                t = time.monotonic()
                fill = (await filled.get()).result()  # a source's failure (the pool's) is raised here
                stats.wait_s += time.monotonic() - t
                await places.acquire()
                task = loop.create_task(device_batch(fill))
                running.add(task)
                task.add_done_callback(lambda t: (places.release(), running.discard(t)))
                for t in [t for t in running if t.done() and t.exception() is not None]:
                    t.result()
            while running:
                await asyncio.gather(*list(running))
        finally:
            for t in running:
                t.cancel()

    tasks = [loop.create_task(feeder()), loop.create_task(consumer())]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        executor.shutdown(wait=True)
        stats.wall_s = time.monotonic() - t_start
    return stats


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """A fresh event loop: uvloop when installed ("auto"), or the one asked for."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            if kind == "uvloop":
                raise
    return asyncio.new_event_loop()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"

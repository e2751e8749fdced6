"""Worker processes: start, feed, watch, restart, shut down.

The pool fills ring slots. `fill(slot, ...)` splits a batch into chunks, sends each chunk to a
worker over its socket, and returns a future that resolves when every chunk has been answered.
Everything runs on the event loop: a worker's socket is a reader (`loop.add_reader`), so waiting
for workers never polls; a worker that dies closes its socket, which the same reader sees at once.

Dead workers (see NOTE [Slot ownership and shutdown] in engine/pipeline/ring.py): the rows of its
unanswered chunks that are not OK are sent again to a replacement. The row it was decoding
(status BUSY) is charged one death; an image charged two deaths is failed, not retried forever.
A watchdog kills a worker stuck on one image for longer than `image_timeout` the same way.
Deaths are seen at once (EOF on the socket, not a poll), so the latency is the event loop's.
The pool gives up only when workers keep dying without finishing any chunk
(`max_consecutive_deaths` deaths with no image finished in between by any worker: a broken
decoder library or no memory, not a few bad files); its `PoolError` then
names the last worker, the image it was decoding and how it died.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.util
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Deque, Dict, List, Optional, Sequence, Tuple

from engine.config import PreprocessSpec, format_resize
from engine.errors import RunError
from engine.pipeline.dataset import Dataset
from engine.pipeline.ring import BUSY, EMPTY, FAILED, OK, Ring
from preprocess.containers import describe


class PoolError(RunError):
    """The pool cannot go on; the message names the worker, the image and the cause."""


class WorkerError(PoolError):
    """An unexpected exception in a worker, re-raised in the parent with its traceback."""

    def __init__(self, worker: int, path: str, tb: str):
        super().__init__(f"worker {worker} failed on {path}:\n{tb.rstrip()}")
        self.worker, self.path, self.traceback = worker, path, tb


@dataclass
class Fill:
    """One batch being filled into a slot; the future's result once all its chunks are in."""

    slot: int
    batch_no: int
    start: int
    n: int
    future: "asyncio.Future[Fill]"
    pending: set = field(default_factory=set)
    failures: List[Tuple[int, str]] = field(default_factory=list)  # (row, reason)
    submitted: float = 0.0
    done_at: float = 0.0


@dataclass
class _Job:
    id: int
    fill: Fill
    rows: List[Tuple[int, str]]
    group: Optional[Tuple[int, int]] = None  # Parquet: (shard, row group) its rows are in (`_take`)


@dataclass
class JobSpan:
    """A chunk as a worker ran it, on the worker's own clock (time.monotonic, system-wide)."""

    worker: int
    slot: int
    batch_no: int
    images: int
    start: float
    end: float


class _Worker:
    def __init__(self, wid: int, proc: subprocess.Popen, conn: Connection):
        self.wid, self.proc, self.conn = wid, proc, conn
        self.jobs: "collections.OrderedDict[int, _Job]" = collections.OrderedDict()
        self.ready = False
        self.alive = True
        self.timed_out: Optional[float] = None  # seconds on one image when the watchdog killed it


def _describe_exit(rc: Optional[int]) -> str:
    if rc is None:
        return "stopped answering"
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def _package_root() -> str:
    spec = importlib.util.find_spec("preprocess")
    assert spec is not None and spec.origin, "the preprocess package is not importable"
    return os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))


def _chunks(todo: List[int], size: int, ds: Dataset, start: int) -> List[List[int]]:
    """The rows of a fill in jobs of at most `size`. Parquet rows: a job never spans two row groups
    (a worker reads a row group's images once per job it gets, engine/pipeline/containers/)."""
    c = ds.container
    if c is None or c.read != "parquet":
        return [todo[lo:lo + size] for lo in range(0, len(todo), size)]
    out: List[List[int]] = []
    last = None
    for r in todo:
        key = (int(c.file_ids[start + r]), int(c.a[start + r]))
        if not out or len(out[-1]) >= size or key != last:
            out.append([])
        out[-1].append(r)
        last = key
    return out


class WorkerPool:
    """`workers` single-threaded decode processes writing into `ring`."""

    def __init__(self, ring: Ring, dataset: Dataset, spec: PreprocessSpec, workers: int,
                 prefetch: int = 2, image_timeout: float = 120.0, chunk: int = 0,
                 max_idle_deaths: int = 50, max_consecutive_deaths: int = 20,
                 max_image_pixels: Optional[int] = None, max_spans: int = 20000):
        self.ring, self.dataset, self.spec = ring, dataset, spec
        self.size = workers
        self.prefetch = prefetch
        self.image_timeout = image_timeout
        self.chunk = chunk or max(1, min(16, math.ceil(ring.batch / workers)))
        self.max_idle_deaths = max_idle_deaths
        self.max_consecutive_deaths = max_consecutive_deaths
        self.max_image_pixels = max_image_pixels
        self.workers: Dict[int, _Worker] = {}
        self.queue: Deque[_Job] = collections.deque()
        # the first `max_spans` chunks, for traces; per-worker totals are kept apart (`_totals`),
        # so a 10-million-image run does not grow the parent's memory
        self.spans: List[JobSpan] = []
        self.max_spans = max_spans
        self._totals: Dict[int, List[float]] = {}  # worker -> [images, busy seconds]
        self.deaths: List[Tuple[int, str, Optional[str]]] = []  # (worker, how, path being decoded)
        self.death_times: List[float] = []  # time.monotonic() when each death was handled
        self._consecutive_deaths = 0
        self._kills: Dict[int, int] = collections.Counter()  # dataset index -> deaths while decoding it
        self._next_wid = 0
        self._next_job = 0
        self._idle_deaths = 0
        self._error: Optional[BaseException] = None
        self._fills: Dict[int, Fill] = {}
        self._closing = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._watchdog: Optional[asyncio.TimerHandle] = None
        self._ready_waiters: List[asyncio.Future] = []
        self._owners: Dict[Tuple[int, int], int] = {}  # Parquet row group -> the worker that read it

    # -- start -------------------------------------------------------------------------------
    async def start(self, timeout: float = 120.0) -> None:
        """Start every worker and wait until each has attached to the ring."""
        self._loop = asyncio.get_running_loop()
        for _ in range(self.size):
            self._spawn()
        deadline = time.monotonic() + timeout
        while not all(w.ready for w in self.workers.values()):
            self._raise_if_failed()
            if time.monotonic() > deadline:
                raise PoolError(f"workers did not start within {timeout:.0f} s")
            waiter = self._loop.create_future()
            self._ready_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, timeout=1.0)
            except asyncio.TimeoutError:
                pass
        self._raise_if_failed()
        self._arm_watchdog()

    def _spawn(self) -> _Worker:
        wid = self._next_wid
        self._next_wid += 1
        parent_sock, child_sock = socket.socketpair()
        spec = self.spec
        cmd = [
            sys.executable, "-m", "preprocess.worker",
            "--fd", str(child_sock.fileno()), "--ring", self.ring.name,
            "--slots", str(self.ring.slots), "--batch", str(self.ring.batch),
            "--crop", str(self.ring.shape[0]), str(self.ring.shape[1]),
            "--resize", format_resize(spec.resize), "--interpolation", spec.interpolation,
            "--decode", spec.decode, "--parent", str(os.getpid()),
        ]
        if self.max_image_pixels:
            cmd += ["--max-image-pixels", str(self.max_image_pixels)]
        env = dict(os.environ)
        root = _package_root()
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"  # workers are single-threaded
        try:
            proc = subprocess.Popen(cmd, pass_fds=(child_sock.fileno(),), env=env, stdin=subprocess.DEVNULL)
        finally:
            child_sock.close()
        conn = Connection(parent_sock.detach())
        w = _Worker(wid, proc, conn)
        self.workers[wid] = w
        assert self._loop is not None
        self._loop.add_reader(conn.fileno(), self._on_readable, w)
        return w

    # -- feeding -----------------------------------------------------------------------------
    def fill(self, slot: int, batch_no: int, start: int, n: int,
             rows: Optional[Sequence[int]] = None) -> "asyncio.Future[Fill]":
        """Fill `slot` with dataset images [start, start + n); resolves to the `Fill`.

        `rows` (sorted row numbers): decode only these; the caller has already written the other
        rows' pixels, status (OK or FAILED) and decode time (the pixel cache's hits, see
        engine/pipeline/sources.py). None: every row.
        """
        assert self._loop is not None, "start() the pool first"
        self._raise_if_failed()
        ring, ds = self.ring, self.dataset
        ring.labels[slot, :n] = ds.labels[start:start + n]
        ring.indices[slot, :n] = range(start, start + n)
        todo = list(range(n)) if rows is None else [int(r) for r in rows]
        if rows is None:
            ring.status[slot, :] = EMPTY
        else:
            ring.status[slot, n:] = EMPTY
            ring.status[slot, todo] = EMPTY
        fut = self._loop.create_future()
        f = Fill(slot, batch_no, start, n, fut, submitted=time.monotonic())
        if not todo:  # nothing to decode: ready at once
            f.done_at = f.submitted
            fut.set_result(f)
            return fut
        self._fills[slot] = f
        container = ds.container if ds.container is not None and ds.container.read == "parquet" else None
        for rows_ in _chunks(todo, self.chunk, ds, start):
            chunk = [(r, ds.locator(start + r)) for r in rows_]
            group = (int(container.file_ids[start + rows_[0]]), int(container.a[start + rows_[0]])) \
                if container is not None else None
            job = _Job(self._next_job, f, chunk, group)
            self._next_job += 1
            f.pending.add(job.id)
            self.queue.append(job)
        self._pump()
        return fut

    @property
    def started(self) -> bool:
        """`start()` has been called (workers were spawned)."""
        return self._loop is not None

    def _pump(self) -> None:
        while self.queue:
            ready = [w for w in self.workers.values() if w.ready and w.alive and len(w.jobs) < self.prefetch]
            if not ready:
                return
            w = min(ready, key=lambda w: len(w.jobs))
            job = self._take(w)
            w.jobs[job.id] = job
            try:
                w.conn.send((job.id, job.fill.slot, job.rows))
            except OSError:
                self._on_death(w)

    def _take(self, w: _Worker) -> _Job:
        """The next job for worker `w`: the queue's head, except for Parquet rows, where a job of a
        row group `w` already read (or of one no live worker holds) a little further on comes
        first, so each row group is read by as few workers as keep everyone busy (a worker
        reads a whole row group for any of its rows). Never idles a worker: with nothing of its
        own in sight, it takes the head."""
        queue = self.queue
        if queue[0].group is None:
            return queue.popleft()
        # a Parquet pool: every job has its row group (one data set, one reader)
        pick = None
        for k in range(min(len(queue), 4 * max(1, self.size))):
            owner = self._owners.get(queue[k].group)  # type: ignore[arg-type]
            if owner == w.wid:
                pick = k
                break
            if pick is None and (owner is None or owner not in self.workers):
                pick = k
        job = queue[pick or 0]
        del queue[pick or 0]
        group = job.group
        assert group is not None
        owner = self._owners.get(group)
        if owner is None or owner not in self.workers:
            self._owners[group] = w.wid
            if len(self._owners) > 4096:  # old row groups: forget the oldest half
                for key in list(self._owners)[:2048]:
                    del self._owners[key]
        return job

    # -- messages ----------------------------------------------------------------------------
    def _on_readable(self, w: _Worker) -> None:
        try:
            while w.alive and w.conn.poll():
                self._handle(w, w.conn.recv())
        except (EOFError, OSError):
            self._on_death(w)

    def _handle(self, w: _Worker, msg) -> None:
        kind = msg[0]
        if kind == "ready":
            w.ready = True
            for waiter in self._ready_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._ready_waiters.clear()
            self._pump()
        elif kind == "done":
            _, job_id, failures, t0, t1 = msg
            job = w.jobs.pop(job_id)
            f = job.fill
            f.failures.extend(failures)
            total = self._totals.setdefault(w.wid, [0, 0.0])
            total[0] += len(job.rows)
            total[1] += t1 - t0
            if len(self.spans) < self.max_spans:
                self.spans.append(JobSpan(w.wid, f.slot, f.batch_no, len(job.rows), t0, t1))
            self._consecutive_deaths = 0  # images were finished (decoded or failed): workers make progress
            self._job_finished(f, job_id)
            self._pump()
        elif kind == "error":
            _, job_id, row, path, tb = msg
            self._fail(WorkerError(w.wid, path, tb))
        else:  # pragma: no cover - protocol bug
            self._fail(PoolError(f"worker {w.wid} sent an unknown message {kind!r}"))

    def _job_finished(self, f: Fill, job_id: int) -> None:
        f.pending.discard(job_id)
        if not f.pending and not f.future.done():
            f.done_at = time.monotonic()
            self._fills.pop(f.slot, None)
            f.future.set_result(f)

    # -- faults ------------------------------------------------------------------------------
    def _on_death(self, w: _Worker) -> None:
        if not w.alive:
            return
        w.alive = False
        assert self._loop is not None
        self._loop.remove_reader(w.conn.fileno())
        w.conn.close()
        try:
            rc = w.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            rc = w.proc.wait()
        del self.workers[w.wid]
        if self._closing:
            return
        how = _describe_exit(rc)
        if w.timed_out is not None:
            how = f"was stuck for over {self.image_timeout:g} s on one image (--image-timeout) and was killed"
        if not w.ready:
            self._fail(PoolError(
                f"worker {w.wid} (pid {w.proc.pid}) {how} before it started; its error output is above"))
            return
        culprit = None
        progressed = any(self.ring.status[job.fill.slot, row] in (OK, FAILED)
                         for job in w.jobs.values() for row, _ in job.rows)
        for job in w.jobs.values():
            f = job.fill
            status = self.ring.status[f.slot]
            redo = []
            for row, path in job.rows:
                s = status[row]
                if s == OK:
                    continue
                if s == BUSY:
                    culprit = describe(path)
                    index = f.start + row
                    self._kills[index] += 1
                    if self._kills[index] >= 2:
                        status[row] = FAILED
                        f.failures.append((row, f"the worker decoding it {how}, twice; not retried again"))
                        continue
                status[row] = EMPTY
                redo.append((row, path))
            if redo:
                again = _Job(self._next_job, f, redo, job.group)
                self._next_job += 1
                f.pending.add(again.id)
                self.queue.appendleft(again)
            self._job_finished(f, job.id)
        self.deaths.append((w.wid, how, culprit))
        self.death_times.append(time.monotonic())
        where = f" while decoding {culprit}" if culprit else ""
        self._consecutive_deaths = 1 if progressed else self._consecutive_deaths + 1
        if self._consecutive_deaths >= self.max_consecutive_deaths:
            self._fail(PoolError(
                f"workers keep dying: {self._consecutive_deaths} deaths in a row with no image finished in between;"
                f" last: worker "
                f"{w.wid} (pid {w.proc.pid}) {how}{where}. A broken decoder library, or out of memory "
                f"(dmesg shows the OOM killer); try --workers 1 on that image"))
            return
        print(f"warning: worker {w.wid} (pid {w.proc.pid}) {how}{where}; "
              f"started a new worker, its unfinished images are decoded again", file=sys.stderr)
        if culprit is None:
            self._idle_deaths += 1
            if self._idle_deaths > self.max_idle_deaths:
                self._fail(PoolError(f"workers keep dying ({self._idle_deaths} times, last: worker {w.wid} {how})"))
                return
        self._spawn()
        self._pump()

    def _arm_watchdog(self) -> None:
        assert self._loop is not None
        self._watchdog = self._loop.call_later(1.0, self._check_stuck)

    def _check_stuck(self) -> None:
        """Kill a worker stuck on one image; `_on_death` then charges and redoes that image."""
        now = time.monotonic()
        for w in list(self.workers.values()):
            for job in w.jobs.values():
                slot = job.fill.slot
                for row, path in job.rows:
                    if self.ring.status[slot, row] == BUSY and now - self.ring.started[slot, row] > self.image_timeout:
                        print(f"warning: worker {w.wid} spent over {self.image_timeout:g} s on {describe(path)}; "
                              "killing it",
                              file=sys.stderr)
                        w.timed_out = now - self.ring.started[slot, row]
                        w.proc.kill()
                        break
        if not self._closing:
            self._arm_watchdog()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        for f in list(self._fills.values()):
            if not f.future.done():
                f.future.set_exception(error)
                f.future.exception()  # the run raises the error once; unawaited fills must not log it again
        for waiter in self._ready_waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # -- stats and shutdown ------------------------------------------------------------------
    def worker_stats(self) -> List[Dict]:
        return [{"worker": k, "images": int(v[0]), "busy_s": v[1]} for k, v in sorted(self._totals.items())]

    def stopping(self) -> None:
        """A stop was asked for (a signal): from now on a worker that dies is not replaced."""
        self._closing = True

    def close(self, timeout: float = 3.0) -> None:
        """End every worker: ask politely (EOF), then kill. Safe to call twice."""
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        workers = list(self.workers.values())
        for w in workers:
            if self._loop is not None and w.alive:
                try:
                    self._loop.remove_reader(w.conn.fileno())
                except (ValueError, OSError, RuntimeError):
                    pass
            try:
                w.conn.send(None)
            except OSError:
                pass
            w.conn.close()
            w.alive = False
        deadline = time.monotonic() + timeout
        for w in workers:
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        self.workers.clear()

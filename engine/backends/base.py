"""The backend interface: one per device, so the scheduler has no `if cuda / if npu` branches.

Calls from the scheduler (all of them may block, so it runs them in executor threads):

    prepare(batch_size)         load or compile the model for this batch size (and cache it)
    register_host_memory(buf)   the ring's shared memory: pin it where the device allows
    submit(pixels) -> InFlight  start the H2D copy of a uint8 NHWC batch and the model after it
    InFlight.copied()           block until the host pixels may be overwritten (slot reusable)
    InFlight.result()           block until the logits are on the host: float32 [n, classes]
    compute_only(bs, it, warm)  latencies (s) of the model alone, inputs already on the device
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from engine.errors import RunError
from engine.config import RunConfig


# A batch read from the pixel cache is a slice of a read-only mapping; backends wrap it with
# torch.from_numpy only to copy from it (to the device or to staging), never to write, so torch's
# warning about non-writable arrays says nothing useful (engine/pipeline/sources.py, CacheSource).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class BackendError(RunError):
    """The backend cannot run this configuration; the message says what to change."""


class AllDevicesLost(BackendError):
    """Every device process of --devices was lost: the run cannot go on (its report is partial)."""


class DeviceLost(BackendError):
    """From `InFlight.result()`: the device (a device process of --devices) was lost after it had
    copied the batch; the scheduler decodes the batch again and submits it to another device."""


class InFlight:
    """A submitted batch."""

    def copied(self) -> None:
        """Block until the batch's host memory may be reused."""

    def result(self) -> np.ndarray:
        """Block until the logits are on the host; float32 `[n, classes]`."""
        raise NotImplementedError

    def failed_rows(self) -> List[Tuple[int, str]]:
        """After `result()`: `(row, reason)` of images the backend itself could not decode (--decode
        device); their logits are meaningless and the scheduler counts them as failed."""
        return []


class Backend:
    name = "base"
    #: the device can report completion with events (else completion is a blocking synchronize)
    has_events = False
    #: a static-shape backend needs every batch padded to the prepared batch size
    static_shape = False
    #: why `--backend auto` picked this backend (set by create_backend), else None
    auto_reason = None
    #: devices this backend drives at once (the device processes of --devices drive several):
    #: the scheduler keeps `--inflight` batches in flight per device
    device_count = 1

    def __init__(self, config: RunConfig):
        self.config = config
        self.spec = config.preprocess
        self.batch_size = 0

    def prepare(self, batch_size: int) -> None:
        raise NotImplementedError

    def device_count_available(self):
        """How many devices of this kind the host has (what `--devices all` means), or None where
        the backend has no devices to count (cpu, sim). Asked inside a device process only."""
        return None

    def register_ring(self, ring) -> None:
        """The run's ring (engine/pipeline/ring.py): by default its memory is pinned where the
        device allows (`register_host_memory`); device processes map it by name instead."""
        self.register_host_memory(ring.buffer())

    def register_pixel_cache(self, cache) -> None:
        """The run's pixel cache (batches read from it are slices of its mapping); the default
        needs nothing: its slices are host memory like any other."""

    def register_host_memory(self, buffer) -> None:
        """Pin the ring's memory where the device allows; the default does nothing."""

    def unregister_host_memory(self) -> None:
        """Undo `register_host_memory` before the ring is unlinked."""

    def submit(self, pixels: np.ndarray) -> InFlight:
        raise NotImplementedError

    #: takes compressed JPEGs (`--decode device`: an EncodedBatch, engine/pipeline/encoded.py)
    decodes_jpeg = False
    #: its `--decode device` stage (engine/backends/decodestage.py) once prepared for it, else None
    decode_stage: Any = None

    def submit_batch(self, batch) -> InFlight:
        """Submit a source's `Batch` (engine/pipeline/sources.py): its pixels, or for a backend that
        decodes JPEGs itself, its compressed bytes as well."""
        if getattr(batch, "arena", None) is not None:
            raise BackendError(f"--decode device needs a backend that decodes JPEGs (cuda), not {self.name}")
        return self.submit(batch.pixels)

    def compute_only(self, batch_size: int, iterations: int, warmup: int = 1) -> List[float]:
        """Wall time of `iterations` model calls on a resident batch, each ending synchronised."""
        raise NotImplementedError

    def compute_only_alone(self, batch_size: int, iterations: int) -> None:
        """Several devices (--devices): measure each one's compute-only alone too (what ais_bench
        sums); one device has nothing more to measure."""

    def devices_report(self, wall_s: float) -> Optional[List[Dict]]:
        """Several devices (--devices): one object per device for the report; None for one."""
        return None

    def stopping(self) -> None:
        """A stop signal arrived: the run is being cancelled (nothing to do for one device)."""

    def describe(self) -> Dict:
        """What ran: device, precision, model source; goes into the report."""
        return {"backend": self.name}

    def close(self) -> None:
        """Release the device; idempotent."""


class HostBuffers:
    """Reusable host staging buffers: made on first need by `make()`, at most `limit` of them;
    `acquire()` blocks while every one is in flight, until a finished copy `release()`s one."""

    def __init__(self, make: Callable[[], object], limit: int):
        self._make, self._limit = make, limit
        self._free: "queue.Queue" = queue.Queue()
        self._made = 0
        self._lock = threading.Lock()

    def acquire(self):
        with self._lock:
            try:
                return self._free.get_nowait()
            except queue.Empty:
                make = self._made < self._limit
                self._made += make
        if make:
            return self._make()
        return self._free.get()

    def release(self, buf) -> None:
        self._free.put(buf)


def timed_calls(call, sync, iterations: int, warmup: int) -> List[float]:
    """Run `call(); sync()` warmup + iterations times; the timed latencies in seconds."""
    for _ in range(warmup):
        call()
        sync()
    out = []
    for _ in range(iterations):
        t = time.perf_counter()
        call()
        sync()
        out.append(time.perf_counter() - t)
    return out

"""A simulated accelerator, to measure the pipeline's overlap on a machine with none.

Each batch costs `--sim-batch-ms` of "device" time and nbytes / `--sim-h2d-gbps` of "copy" time,
on two timelines like a copy engine and a compute engine. Waiting is `time.sleep` (no CPU, GIL
released). The copy is also a real one: `submit` copies every byte of the host batch into a
"device" buffer (one per batch in flight, made once and reused) before the modelled copy time
starts, so a run pays the memory traffic a real H2D copy pays (a batch read from the pixel cache
is read, not just pointed at). Logits are a cheap deterministic function of the copied pixels
(`sim_logits`), so results can be checked against the same function applied to
reference-preprocessed pixels.
"""

from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional

import numpy as np

from engine.backends.base import Backend, InFlight


def sim_logits(pixels: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 `[n, num_classes]`: a hash of a pixel subsample picks the top class, then 4 more."""
    n = pixels.shape[0]
    sample = pixels[:, ::8, ::8, :].reshape(n, -1).astype(np.int64)
    weights = (np.arange(sample.shape[1], dtype=np.int64) * 2654435761) % 1000003
    top = (sample * weights).sum(axis=1) % num_classes
    logits = np.zeros((n, num_classes), np.float32)
    rows = np.arange(n)
    for j in range(min(5, num_classes)):
        logits[rows, (top + 7 * j) % num_classes] = 5.0 - j
    return logits


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


class _SimBatch(InFlight):
    def __init__(self, copy_end: float, done: float, device: np.ndarray, num_classes: int, release):
        self.copy_end, self.done, self.num_classes = copy_end, done, num_classes
        self.device: Optional[np.ndarray] = device  # the "device" copy, until the model has read it
        self._release = release
        self.logits: Optional[np.ndarray] = None

    def copied(self) -> None:
        _sleep_until(self.copy_end)

    def result(self) -> np.ndarray:
        if self.logits is None:
            # the "model" reads the device copy while the simulated device time runs
            assert self.device is not None
            self.logits = sim_logits(self.device, self.num_classes)
            self.device = None
            if self._release is not None:  # the input buffer is free again
                self._release()
                self._release = None
        _sleep_until(self.done)
        return self.logits


class SimBackend(Backend):
    name = "sim"
    has_events = True

    def __init__(self, config):
        super().__init__(config)
        self.batch_s = config.backend.sim.batch_ms / 1000.0
        self.gbps = config.backend.sim.h2d_gbps
        self._lock = threading.Lock()
        self._copy_free = 0.0
        self._device_free = 0.0
        self._buffers: List[np.ndarray] = []  # free "device" input buffers, [batch, H, W, 3] uint8
        self.copied_bytes = 0

    def prepare(self, batch_size: int) -> None:
        self.batch_size = batch_size
        with self._lock:
            self._buffers = []  # made by the first batches (one per batch in flight), then reused

    def _new_buffer(self, rows: int) -> np.ndarray:
        return np.empty((rows,) + tuple(self.spec.shape), np.uint8)

    def _take_buffer(self, rows: int) -> np.ndarray:
        with self._lock:
            for k, buf in enumerate(self._buffers):
                if buf.shape[0] >= rows:
                    return self._buffers.pop(k)
        return self._new_buffer(max(rows, self.batch_size))  # all in flight: one more

    def _give_buffer(self, buf: np.ndarray) -> None:
        with self._lock:
            self._buffers.append(buf)

    def _schedule(self, nbytes: int):
        with self._lock:
            now = time.monotonic()
            copy_s = nbytes / (self.gbps * 1e9) if self.gbps else 0.0
            copy_end = max(now, self._copy_free) + copy_s
            self._copy_free = copy_end
            done = max(copy_end, self._device_free) + self.batch_s
            self._device_free = done
        return copy_end, done

    def submit(self, pixels: np.ndarray) -> InFlight:
        n = pixels.shape[0]
        buf = self._take_buffer(n)
        device = buf[:n]
        np.copyto(device, pixels)  # the real copy: every byte of the host batch is read
        self.copied_bytes += pixels.nbytes
        copy_end, done = self._schedule(pixels.nbytes)
        return _SimBatch(copy_end, done, device, self.config.data.num_classes, lambda: self._give_buffer(buf))

    def compute_only(self, batch_size: int, iterations: int, warmup: int = 1) -> List[float]:
        out = []
        for i in range(warmup + iterations):
            t = time.perf_counter()
            with self._lock:
                done = max(time.monotonic(), self._device_free) + self.batch_s
                self._device_free = done
            _sleep_until(done)
            if i >= warmup:
                out.append(time.perf_counter() - t)
        return out

    def describe(self) -> Dict:
        return {"backend": self.name, "device": "simulated", "batch_ms": self.batch_s * 1000,
                "h2d_gbps": self.gbps, "model": self.config.model.name, "source": "sim_logits"}

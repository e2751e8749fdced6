"""A simulated accelerator, to measure the pipeline's overlap on a machine with none.

Each batch costs `--sim-batch-ms` of "device" time and nbytes / `--sim-h2d-gbps` of "copy" time,
on two timelines like a copy engine and a compute engine. Waiting is `time.sleep` (no CPU, GIL
released). Logits are a cheap deterministic function of the pixels (`sim_logits`), so results
can be checked against the same function applied to reference-preprocessed pixels.
"""

from __future__ import annotations

import threading
import time
from typing import Dict, List

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
    def __init__(self, copy_end: float, done: float, logits: np.ndarray):
        self.copy_end, self.done, self.logits = copy_end, done, logits

    def copied(self) -> None:
        _sleep_until(self.copy_end)

    def result(self) -> np.ndarray:
        _sleep_until(self.done)
        return self.logits


class SimBackend(Backend):
    name = "sim"
    has_events = True

    def __init__(self, config):
        super().__init__(config)
        self.batch_s = config.sim_batch_ms / 1000.0
        self.gbps = config.sim_h2d_gbps
        self._lock = threading.Lock()
        self._copy_free = 0.0
        self._device_free = 0.0

    def prepare(self, batch_size: int) -> None:
        self.batch_size = batch_size

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
        logits = sim_logits(pixels, self.config.num_classes)  # reads the pixels before the slot is freed
        copy_end, done = self._schedule(pixels.nbytes)
        return _SimBatch(copy_end, done, logits)

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
                "h2d_gbps": self.gbps, "model": self.config.model, "source": "sim_logits"}

"""The device-decode source: workers put compressed JPEGs into the ring, the backend decodes them.

`--decode device` (engine/backends/gpudecode.py has the device side): the ring gets a byte arena
per slot (NOTE [Slot ownership and shutdown] in engine/pipeline/ring.py). For each image a worker
reads the file and sniffs its headers (preprocess/jpeghead.py): a JPEG the device decoder takes
goes into the arena as bytes; anything else (progressive, grayscale, CMYK/YCCK, PNG named .JPEG,
truncated, too large) and a share of the JPEGs (`--host-decode-share`) is decoded by the worker in
exact mode into the slot's pixel row. The batch carries both; the backend decodes the bytes, copies
the pixel rows, and scores every image. Counting is as for the pool: one status per image, failures
with their reasons (the backend adds the rare image the device decoder and exact mode both fail on).

Hybrid decoding (DALI's `hw_decoder_load`): `HostShareTuner` picks the share of device-decodable
JPEGs the workers decode themselves, so the device decoder and the workers finish a batch at about
the same time; fixed with `--host-decode-share FRACTION`, or measured (`auto`): see `share`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from engine.pipeline.pool import Fill, WorkerPool
from engine.pipeline.ring import CTRL_HOST_SHARE, CTRL_KINDS, CTRL_MAX_PIXELS, OK, Ring
from engine.pipeline.sources import Batch, PoolSource

#: the largest image the device path takes, in pixels (bigger ones are decoded by the host)
DEVICE_MAX_PIXELS = 64 * 2 ** 20


@dataclass
class EncodedBatch(Batch):
    """A `Batch` whose device rows (`route == ROUTE_DEVICE`) hold compressed bytes in `arena`
    instead of pixels. `arena` points into shared memory like `pixels` (valid until `release()`);
    the per-image arrays are the batch's own copies."""

    arena: Optional[np.ndarray] = None  # uint8 [arena bytes] of the slot
    offsets: Optional[np.ndarray] = None  # int64 [n]
    lengths: Optional[np.ndarray] = None  # int64 [n]
    route: Optional[np.ndarray] = None  # int8 [n], preprocess/jpeghead.py ROUTE_* / HOST_*


class HostShareTuner:
    """The share of device-decodable JPEGs the host workers decode.

    Fixed (`share` given) or auto: from measured costs, per image, of
      d  an exact decode on one worker (the HOST_SHARE rows' decode times),
      r  reading a file into the arena on one worker (the DEVICE rows' times),
      g  the device decoder's rate, img/s (its decode stream's time, `observe_device`),
    with W workers a batch of N images takes N (1 - s) / g on the device and
    N (s d + (1 - s) r) / W on the workers; they are equal at
      s = (a - r) / (a - r + d),  a = W / g,
    clamped to [0, max_share]. Until every cost has been measured the share is `probe` (a few
    images through each path, so each is measured)."""

    def __init__(self, workers: int, share: Optional[float] = None, max_share: float = 0.9, probe: float = 0.05):
        self.workers, self.fixed, self.max_share, self.probe = max(1, workers), share, max_share, probe
        self.host_s = self.host_n = 0.0
        self.read_s = self.read_n = 0.0
        self.device_s = self.device_n = 0.0

    def observe_host(self, seconds: float, images: int) -> None:
        self.host_s += seconds
        self.host_n += images

    def observe_read(self, seconds: float, images: int) -> None:
        self.read_s += seconds
        self.read_n += images

    def observe_device(self, seconds: float, images: int) -> None:
        self.device_s += seconds
        self.device_n += images

    @property
    def share(self) -> float:
        if self.fixed is not None:
            return self.fixed
        if not (self.host_n and self.read_n and self.device_n and self.device_s > 0):
            return self.probe
        d, r = self.host_s / self.host_n, self.read_s / self.read_n
        a = self.workers * self.device_s / self.device_n  # worker-seconds per image of device time
        if a <= r:
            return 0.0
        return min(self.max_share, (a - r) / (a - r + d))

    def report(self) -> Dict:
        rate = lambda n, s: n / s if s > 0 else None  # noqa: E731
        return {"mode": "fixed" if self.fixed is not None else "auto", "share": self.share,
                "host_exact_img_per_s_per_worker": rate(self.host_n, self.host_s),
                "read_img_per_s_per_worker": rate(self.read_n, self.read_s),
                "device_decode_img_per_s": rate(self.device_n, self.device_s)}


class DeviceDecodeSource(PoolSource):
    """The decode pool in `--decode device` mode: batches are `EncodedBatch`es."""

    def __init__(self, pool: WorkerPool, ring: Ring, pad_to: int = 0, tuner: Optional[HostShareTuner] = None):
        super().__init__(pool, ring, pad_to)
        assert ring.arena_per_image, "--decode device needs a ring with a byte arena (session.make_ring)"
        self.tuner = tuner

    async def fill(self, batch_no: int, start: int, n: int):
        if self.tuner is not None:
            # read by the workers when their chunk starts (preprocess/worker.py BytePlacer)
            self.ring.control[CTRL_HOST_SHARE] = self.tuner.share
        return await super().fill(batch_no, start, n)

    def batch_of(self, f: Fill) -> Batch:
        from preprocess.jpeghead import HOST_SHARE, ROUTE_DEVICE

        base = super().batch_of(f)
        ring, slot, n = self.ring, f.slot, f.n
        route = ring.route[slot, :n].copy()
        if self.tuner is not None:
            ok = ring.status[slot, :n] == OK
            ns = ring.decode_ns[slot, :n]
            for code, observe in ((HOST_SHARE, self.tuner.observe_host), (ROUTE_DEVICE, self.tuner.observe_read)):
                rows = ok & (route == code)
                if rows.any():
                    observe(float(ns[rows].sum()) / 1e9, int(rows.sum()))
        fields = {fl.name: getattr(base, fl.name) for fl in dataclasses.fields(Batch)}
        return EncodedBatch(**fields, arena=ring.arena(slot), offsets=ring.offsets[slot, :n].copy(),
                            lengths=ring.lengths[slot, :n].copy(), route=route)


def device_decode_source(pool: WorkerPool, ring: Ring, backend, cfg, pad_to: int = 0) -> DeviceDecodeSource:
    """The decode pool's source for `--decode device` (made by engine/pipeline/session.py
    `make_source`). Device decode needs a backend that decodes JPEGs (cuda); the ring's control
    words get the decoder's frame kinds and pixel limit, and the tuner is shared with the backend's
    meter."""
    from engine.backends.base import BackendError
    from preprocess.jpeghead import KIND_BITS

    stage = backend.decode_stage
    if stage is None:
        raise BackendError(f"--decode device: the {backend.name} backend was not prepared for it")
    ring.control[CTRL_KINDS] = sum(KIND_BITS[k] for k in stage.decoder.kinds)
    ring.control[CTRL_MAX_PIXELS] = DEVICE_MAX_PIXELS
    share = None if cfg.device_decode.host_decode_share < 0 else cfg.device_decode.host_decode_share
    tuner = HostShareTuner(cfg.pipeline.workers, share)
    ring.control[CTRL_HOST_SHARE] = tuner.share
    if stage.meter is not None:
        stage.meter.tuner = tuner
    return DeviceDecodeSource(pool, ring, pad_to, tuner)

"""`--decode device` as one stage of the cuda backend: its decode stream and lock, the JPEG
decoder, the host fallback and the meter, behind `DeviceDecodeStage.decode(batch) -> DecodedBatch`.

Per `EncodedBatch` (engine/pipeline/encoded.py), on the stage's decode stream, under its lock:

    x = zeros[rows, H, W, 3] uint8 on the device
    host rows (the workers decoded them, exact): H2D copy of their pixel rows
    device rows: decoder.decode(their bytes) -> resize + centre crop into x[row]
                 (engine/backends/gpudecode.py decode_into)
    a row the decoder fails on: exact mode on the host from the same bytes (route HOST_FALLBACK),
                 or a failed row where exact mode fails too
    event `copied` on the decode stream

The backend then runs the model on `x` once `copied` has fired (StreamBackend._enqueue_model) and,
when the batch's result is taken, hands `DecodedBatch.timing` to the stage's meter (`DecodeMeter`),
which reports the decoder as a profile stage (images, seconds, routes) and feeds the host-share tuner.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from engine.backends.gpudecode import JpegDecoder, decode_into

__all__ = ["DecodeMeter", "DecodeTiming", "DecodedBatch", "DeviceDecodeStage", "host_decode"]


@dataclass(frozen=True)
class DecodeTiming:
    """How one batch's decode went, for the meter."""

    start: Optional[Any]  # timing events around the decode section on the decode stream (CUDA),
    end: Optional[Any]  # None where the device module has none
    host_s: float  # host wall time of the decode section
    device_images: int  # rows given to the device decoder
    host_images: int  # rows the workers decoded
    routes: np.ndarray  # the route code of each image that reached the decode (preprocess/jpeghead.py)

    def seconds(self) -> Tuple[float, str]:
        """The decode stream's seconds for this batch, and how they were measured."""
        if self.start is not None and self.end is not None:
            try:
                return self.start.elapsed_time(self.end) / 1000.0, "device events on the decode stream"
            except Exception:
                pass
        return self.host_s, "host wall time of the decode section"


@dataclass
class DecodedBatch:
    """The stage's result: the device batch, the event after which it is complete, the rows neither
    decoder could decode (with the reason), and the timing."""

    x: torch.Tensor
    copied: Any  # the device module's Event
    failed: List[Tuple[int, str]]
    timing: DecodeTiming


def host_decode(data: bytes, crop: Tuple[int, int], resize, interpolation: str,
                max_pixels: Optional[int]) -> np.ndarray:
    """Exact mode on the host for an image the device decoder failed on; raises DecodeError."""
    from preprocess.decode import preprocess_into

    out: np.ndarray = np.zeros((crop[0], crop[1], 3), np.uint8)
    preprocess_into(data, out, resize, interpolation, "exact", max_pixels=max_pixels)
    return out


def _default_limit() -> int:
    from preprocess.worker import pixel_limit

    return pixel_limit(0)


class DecodeMeter:
    """The device decoder as a profile stage: images decoded on the device, the seconds its decode
    stream spent (timing events on CUDA, host wall time of the decode section elsewhere), the
    routes of every image (where it was decoded and why)."""

    def __init__(self):
        self.device_images = 0
        self.host_images = 0
        self.device_s = 0.0
        self.batches = 0
        self.routes: Dict[int, int] = {}
        self.timing = "none"
        self.tuner = None  # engine.pipeline.encoded.HostShareTuner, fed the device's rate
        self._lock = threading.Lock()  # result() runs in several executor threads

    def add(self, timing: DecodeTiming) -> None:
        seconds, self.timing = timing.seconds()
        with self._lock:
            self.batches += 1
            self.device_images += timing.device_images
            self.host_images += timing.host_images
            self.device_s += seconds
            for code in timing.routes.tolist():
                self.routes[code] = self.routes.get(code, 0) + 1
            if self.tuner is not None and timing.device_images:
                self.tuner.observe_device(seconds, timing.device_images)

    def report(self) -> Dict:
        from preprocess.jpeghead import ROUTE_NAMES

        rate = self.device_images / self.device_s if self.device_s > 0 else None
        return {"device_images": self.device_images, "host_images": self.host_images,
                "device_decode_s": self.device_s, "device_decode_img_per_s": rate, "timing": self.timing,
                "batches": self.batches,
                "routes": {ROUTE_NAMES.get(k, str(k)): v for k, v in sorted(self.routes.items())},
                "host_share": self.tuner.report() if self.tuner is not None else None}


class DeviceDecodeStage:
    """`--decode device` for one backend: owns the decode stream, the lock that serialises its use,
    the decoder (a `JpegDecoder`; a test may swap it) and the meter.

    Args:
        dm: the backend's device module (`torch.cuda`, or a test's stand-in): streams and events.
        device: the torch device the decoded batch is made on.
        decoder: the JPEG decoder (engine/backends/gpudecode.py `make_decoder`).
        resize, interpolation: the preprocessing spec's; `resize_method`: "pil" or "tensor".
        max_pixels: the pixel limit of the host fallback (None: the workers' default).
        new_event: makes the `copied` event (the backend's, blocking sync).
    """

    def __init__(self, dm, device: torch.device, decoder: JpegDecoder, resize, interpolation: str,
                 resize_method: str, max_pixels: Optional[int], new_event: Callable[[], Any]) -> None:
        self.dm, self.device, self.decoder = dm, device, decoder
        self.resize, self.interpolation, self.resize_method = resize, interpolation, resize_method
        self.max_pixels = max_pixels
        self._new_event = new_event
        self.stream = dm.Stream(device=device)
        self.lock = threading.Lock()
        self.meter = DecodeMeter()

    def _timing_event(self):
        """A timing event on the decode stream (CUDA), or None where the device module has none."""
        try:
            ev = self.dm.Event(enable_timing=True, blocking=True)
            ev.record(self.stream)
            return ev if hasattr(ev, "elapsed_time") else None
        except Exception:
            return None

    def decode(self, batch, shape: Tuple[int, int, int]) -> DecodedBatch:
        """Decode an `EncodedBatch` into a device batch of `shape` (H, W, C) per image; see the
        module docstring. `batch.route` gets HOST_FALLBACK for the rows decoded on the host."""
        from preprocess.decode import DecodeError
        from preprocess.jpeghead import HOST_FALLBACK, ROUTE_DEVICE

        rows = batch.pixels.shape[0]
        n, ok = batch.n, batch.ok
        on_device = np.flatnonzero(ok & (batch.route[:n] == ROUTE_DEVICE))
        on_host = np.flatnonzero(ok & (batch.route[:n] != ROUTE_DEVICE))
        datas = [torch.from_numpy(batch.arena[o:o + ln]) for o, ln in
                 zip(batch.offsets[on_device].tolist(), batch.lengths[on_device].tolist())]
        h, w, c = shape
        failed: List[Tuple[int, str]] = []
        t0 = time.perf_counter()
        with self.lock, self.dm.stream(self.stream):
            start = self._timing_event()
            x = torch.zeros((rows, h, w, c), dtype=torch.uint8, device=self.device)
            for r in on_host.tolist():
                x[r].copy_(torch.from_numpy(batch.pixels[r]), non_blocking=True)
            bad = decode_into(self.decoder, datas, x, on_device.tolist(), self.resize, self.interpolation,
                              self.resize_method)
            for r, _why in bad:  # the device decoder failed: exact mode on the host, from the same bytes
                data = bytes(batch.arena[batch.offsets[r]:batch.offsets[r] + batch.lengths[r]])
                try:
                    px = host_decode(data, (h, w), self.resize, self.interpolation,
                                     self.max_pixels or _default_limit())
                except DecodeError as e:
                    failed.append((int(r), str(e)))
                    continue
                batch.route[r] = HOST_FALLBACK
                x[r].copy_(torch.from_numpy(px))
            copied = self._new_event()
            copied.record(self.stream)
            end = self._timing_event()
        timing = DecodeTiming(start, end, time.perf_counter() - t0, len(on_device), len(on_host),
                              batch.route[:n][ok].copy())
        return DecodedBatch(x, copied, failed, timing)

    def describe(self) -> Dict:
        return {"jpeg_decoder": self.decoder.describe(), "device_decode": self.meter.report()}

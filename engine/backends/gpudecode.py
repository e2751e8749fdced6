"""`--decode device`: JPEG decode, resize and centre crop on the device (CUDA), behind one interface.

    workers (preprocess/worker.py BytePlacer)      backend (StreamBackend.submit_batch -> cuda.submit_encoded)
    ----------------------------------------      ---------------------------------------------------------
    read file -> sniff headers (jpeghead.py)       decode stream: zeros x[B, H, W, 3] uint8
      JPEG the device takes: bytes -> arena          host rows: H2D copy of their pixel rows
      anything else: exact decode -> pixel row       device rows: synchronize, JpegDecoder.decode(bytes)
                                                     -> resize shorter side (antialias) -> centre crop
                                                     -> x[row]; a row the decoder fails on: exact
                                                     decode of its bytes on the host (or a failure)
                                                   event `copied` (the slot is free again)
                                                   compute stream: wait(copied) -> InputAdapter + model

`JpegDecoder` is the one interface to the decoder library: `decode(list of uint8 CPU tensors)` ->
list of uint8 `[3, H, W]` RGB tensors on its device. `TorchvisionDecoder` is torchvision's
`decode_jpeg(..., device=...)` (nvJPEG on CUDA; libjpeg on the CPU, which the tests use as the
double), batched where torchvision takes lists (0.19+), else one call per image. torchvision marks
its image decoding deprecated from 0.29 in favour of TorchCodec; nvImageCodec is the other
candidate. Either fits behind `JpegDecoder` (register it in DECODERS).

Known traps, each guarded here:
- the decode must not start while work queued on the stream may still write its buffers (H100
  memory corruption, pytorch/vision PR 9606): `TorchvisionDecoder.decode` synchronizes the
  current stream first (the fix TorchCodec carries);
- nvJPEG leaks memory on every decode with CUDA < 11.6: `check_cuda_runtime` refuses it;
- geometry: exact mode's (preprocess/geometry.py), so the crop box is the same; the pixels differ
  (nvJPEG's IDCT and chroma upsampling, the tensor resize): measured by
  bench/device_decode_agreement.py.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from preprocess.geometry import crop_placement, resized_size

#: resize filters the tensor path has; exact mode's other filters (box, hamming, lanczos) do not exist there
TENSOR_FILTERS = ("nearest", "bilinear", "bicubic")
#: the oldest CUDA whose nvJPEG does not leak memory per decode
MIN_CUDA = (11, 6)


class DecodeRefused(RuntimeError):
    """The device path cannot run this configuration; the message says what to change."""


def check_cuda_runtime(version: Optional[str]) -> None:
    """Refuse nvJPEG on a CUDA runtime older than 11.6 (it leaks device memory on every decode)."""
    if not version:
        return
    try:
        major, minor = (int(v) for v in version.split(".")[:2])
    except ValueError:
        return
    if (major, minor) < MIN_CUDA:
        raise DecodeRefused(f"--decode device: torch is built with CUDA {version}, whose nvJPEG leaks device memory "
                            f"on every decode (fixed in CUDA 11.6); install a torch built for CUDA 11.6 or later, "
                            f"or use --decode exact / fast")


def _version(text: str) -> Tuple[int, int]:
    parts = text.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


class JpegDecoder:
    """One interface to a JPEG decoder library: a batch of compressed images -> RGB tensors."""

    name = "base"
    #: frame kinds it is given (preprocess/jpeghead.py KIND_BITS); the workers decode the rest
    kinds: Tuple[str, ...] = ("baseline",)

    def __init__(self, device: torch.device):
        self.device = device

    def decode(self, datas: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """uint8 1-D CPU tensors (one JPEG each) -> uint8 `[3, H, W]` RGB tensors on `self.device`.
        Raises when any image cannot be decoded (the caller then decodes one at a time)."""
        raise NotImplementedError

    def describe(self) -> Dict:
        return {"decoder": self.name, "device": str(self.device), "kinds": list(self.kinds)}


class TorchvisionDecoder(JpegDecoder):
    """`torchvision.io.decode_jpeg(..., device=...)`: nvJPEG on CUDA (the hardware JPEG engine for
    baseline JPEGs on A100/H100/H200), libjpeg on the CPU."""

    name = "torchvision"

    def __init__(self, device: torch.device):
        super().__init__(device)
        import torchvision
        from torchvision.io import ImageReadMode, decode_jpeg

        self._decode, self._rgb = decode_jpeg, ImageReadMode.RGB
        self.version = torchvision.__version__
        self.batched = _version(self.version) >= (0, 19)  # lists of tensors, one batched nvJPEG call

    def decode(self, datas: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if self.device.type == "cuda":
            # pytorch/vision PR 9606: the hardware decoder may write before work queued on the
            # stream has run; wait for it first
            torch.cuda.current_stream(self.device).synchronize()
        if self.batched and len(datas) > 1:
            return list(self._decode(list(datas), mode=self._rgb, device=self.device))
        return [self._decode(d, mode=self._rgb, device=self.device) for d in datas]

    def describe(self) -> Dict:
        return dict(super().describe(), torchvision=self.version, batched=self.batched)


DECODERS = {"torchvision": TorchvisionDecoder}


def make_decoder(name: str, device: torch.device) -> JpegDecoder:
    if name not in DECODERS:
        raise DecodeRefused(f"unknown JPEG decoder {name!r}; one of {', '.join(sorted(DECODERS))}")
    return DECODERS[name](device)


def _filter(interpolation: str):
    from torchvision.transforms import InterpolationMode

    if interpolation not in TENSOR_FILTERS:
        raise DecodeRefused(f"--decode device resizes with tensor filters ({', '.join(TENSOR_FILTERS)}); "
                            f"--interpolation {interpolation} is not one of them: use --decode exact or fast")
    return {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
            "bicubic": InterpolationMode.BICUBIC}[interpolation]


#: how the device path resizes: "pil" (Pillow's fixed-point resampling, computed on tensors only for
#: the crop) or "tensor" (torchvision's antialiased float resize of the whole image)
RESIZE_METHODS = ("pil", "tensor")


def resize_crop_into(img: torch.Tensor, out: torch.Tensor, resize, interpolation: str, method: str = "pil") -> None:
    """Resize a `[3, h, w]` uint8 image's shorter side (or to an `(h, w)` pair) with antialiasing
    and write its centre crop into `out` (`[crop_h, crop_w, 3]`, zeros where the crop pads), with
    exact mode's geometry (preprocess/geometry.py). `method` "pil": Pillow's own arithmetic
    (`pil_resample`), so the same decoded pixels give exact mode's crop bit for bit; "tensor":
    torchvision's `resize(..., antialias=True)` (within one level of Pillow's)."""
    _, h, w = img.shape
    crop_h, crop_w = out.shape[0], out.shape[1]
    new_w, new_h = resized_size(w, h, resize)
    (left, top, right, bottom), (dx, dy) = crop_placement(new_w, new_h, crop_h, crop_w)
    if (new_w, new_h) == (w, h):  # torchvision returns the image untouched at the target size
        part = img[:, top:bottom, left:right]
    elif method == "pil" and interpolation in PIL_FILTERS:
        part = pil_resample(img, new_w, new_h, (left, top, right, bottom), interpolation)
    else:
        from torchvision.transforms.functional import resize as tv_resize

        img = tv_resize(img, [new_h, new_w], interpolation=_filter(interpolation), antialias=True)
        part = img[:, top:bottom, left:right]
    out[dy:dy + bottom - top, dx:dx + right - left].copy_(part.permute(1, 2, 0))


# ---- Pillow's resampling (libImaging/Resample.c), on tensors -----------------------------------
# Pillow resizes in two passes, horizontal then vertical, each with per-output-pixel coefficients
# in 22-bit fixed point, an int32 accumulator starting at 1 << 21 and a clip to 0..255 after each
# pass. The coefficients are computed here in float64 in the same order as the C code (so they are
# the same numbers), and each pass is a gather of the taps and an integer multiply-add: the same
# integers, so the same pixels. Only the rows and columns the centre crop keeps are computed.

PRECISION_BITS = 32 - 8 - 2


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                    np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))


PIL_FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0)}


@functools.lru_cache(maxsize=8192)
def pil_coefficients(in_size: int, out_size: int, interpolation: str) -> Tuple[np.ndarray, np.ndarray, int]:
    """(first source index [out], fixed-point weights [out, ksize], fraction bits) of Pillow's
    `precompute_coeffs` and `normalize_coeffs_8bpc` for a whole axis (box 0..in_size); pillow-simd's
    variant (int16 weights, as many bits as the largest weight leaves) where that is installed."""
    filt, base = PIL_FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    ss = 1.0 / filterscale
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    w = filt(((taps[None, :] + xmin[:, None]) - center[:, None] + 0.5) * ss)
    w[taps[None, :] >= xmax[:, None]] = 0.0
    ww = np.zeros(out_size)
    for t in range(ksize):  # the C code's order of summation
        ww += w[:, t]
    w = np.where(ww[:, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
    bits = PRECISION_BITS
    if _pillow_simd():  # int16 coefficients: the most bits the largest coefficient leaves (normalize_coeffs_8bpc)
        maxkk = w.reshape(-1)[0]
        for v in w.reshape(-1):
            if maxkk < v:
                maxkk = v
        for bits in range(PRECISION_BITS + 1):
            if bits == PRECISION_BITS or int(0.5 + maxkk * (1 << (bits + 1))) >= (1 << 15):
                break
    one = float(1 << bits)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one)).astype(np.int64)
    return xmin, fixed, bits


@functools.lru_cache(maxsize=1)
def _pillow_simd() -> bool:
    """Whether this process's Pillow is pillow-simd (16-bit coefficients, their own precision)."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution
    except ImportError:  # pragma: no cover - Python < 3.8
        return False
    try:
        distribution("pillow-simd")
        return True
    except PackageNotFoundError:
        return False


def _taps(in_size: int, out_size: int, interpolation: str, lo: int, hi: int, device) -> Tuple[torch.Tensor, ...]:
    """Source indices and weights of outputs lo..hi, trimmed to the taps any of them uses; kept on
    the device per size (photos come in few sizes), so a batch does not copy them again."""
    return _taps_on(in_size, out_size, interpolation, lo, hi, str(device))


@functools.lru_cache(maxsize=4096)
def _taps_on(in_size: int, out_size: int, interpolation: str, lo: int, hi: int, device: str) -> Tuple:
    xmin, fixed, bits = pil_coefficients(in_size, out_size, interpolation)
    xmin, fixed = xmin[lo:hi], fixed[lo:hi]
    used = np.flatnonzero(fixed.any(axis=0))
    k = int(used[-1]) + 1 if len(used) else 1
    idx = np.minimum(xmin[:, None] + np.arange(k)[None, :], in_size - 1)  # zero weights past the edge
    first, last = int(idx.min()), int(idx.max()) + 1  # the source span (no device sync to find it)
    return (torch.from_numpy(idx - first).to(device), torch.from_numpy(fixed[:, :k].astype(np.int32)).to(device),
            bits, first, last)


def _clip8(acc: torch.Tensor, bits: int) -> torch.Tensor:
    return ((acc + (1 << (bits - 1))) >> bits).clamp_(0, 255).to(torch.uint8)


def pil_resample(img: torch.Tensor, new_w: int, new_h: int, box: Tuple[int, int, int, int],
                 interpolation: str) -> torch.Tensor:
    """The `box` (left, top, right, bottom, in resized coordinates) of Pillow's
    `img.resize((new_w, new_h), filter)` for a `[C, h, w]` uint8 tensor, as `[C, bottom - top, right - left]`."""
    _, h, w = img.shape
    left, top, right, bottom = box
    dev = img.device
    if new_h != h:
        ridx, rw, rbits, first, last = _taps(h, new_h, interpolation, top, bottom, dev)
        rows = img[:, first:last]
    else:
        rows, ridx, rw = img[:, top:bottom], None, None
    if new_w != w:  # horizontal pass first, as Pillow: [C, R, n, k] taps
        cidx, cw, cbits, first, last = _taps(w, new_w, interpolation, left, right, dev)
        rows = _clip8((rows[:, :, first:last][:, :, cidx] * cw).sum(-1, dtype=torch.int32), cbits)
    else:
        rows = rows[:, :, left:right]
    if ridx is not None:  # then vertical: [C, n, k, W] taps
        rows = _clip8((rows[:, ridx, :] * rw[:, :, None]).sum(2, dtype=torch.int32), rbits)
    return rows


def decode_into(decoder: JpegDecoder, datas: Sequence[torch.Tensor], out: torch.Tensor, rows: Sequence[int],
                resize, interpolation: str, method: str = "pil") -> List[Tuple[int, str]]:
    """Decode `datas` (one per entry of `rows`) and resize-crop each into `out[row]`. Returns
    `(row, why)` for each image the decoder failed on (their rows are left untouched)."""
    failed: List[Tuple[int, str]] = []
    if not rows:
        return failed
    try:
        images: List[Optional[torch.Tensor]] = list(decoder.decode(datas))
    except Exception:  # one bad image fails a batched call: find it, one at a time
        images = []
        for row, data in zip(rows, datas):
            try:
                images.append(decoder.decode([data])[0])
            except Exception as e:
                images.append(None)
                failed.append((row, f"{type(e).__name__}: {str(e)[:200]}"))
    for row, img in zip(rows, images):
        if img is None:
            continue
        if img.dim() != 3 or img.shape[0] != 3:
            failed.append((row, f"the decoder gave a {tuple(img.shape)} image, not [3, H, W]"))
            continue
        resize_crop_into(img, out[row], resize, interpolation, method)
    return failed


def host_decode(data: bytes, crop: Tuple[int, int], resize, interpolation: str,
                max_pixels: Optional[int]) -> np.ndarray:
    """Exact mode on the host for an image the device decoder failed on; raises DecodeError."""
    from preprocess.decode import preprocess_into

    out = np.zeros((crop[0], crop[1], 3), np.uint8)
    preprocess_into(data, out, resize, interpolation, "exact", max_pixels=max_pixels)
    return out


def _default_limit() -> int:
    from preprocess.worker import pixel_limit

    return pixel_limit(0)


def _timing_event(backend):
    """A timing event on the decode stream (CUDA), or None where the device module has none."""
    try:
        ev = backend.dm.Event(enable_timing=True, blocking=True)
        ev.record(backend.decode_stream)
        return ev if hasattr(ev, "elapsed_time") else None
    except Exception:
        return None


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

    def add(self, job) -> None:
        start, end, host_s, n_dev, n_host, route, ok = job.decode_timing
        seconds, self.timing = host_s, "host wall time of the decode section"
        if start is not None and end is not None:
            try:
                seconds, self.timing = start.elapsed_time(end) / 1000.0, "device events on the decode stream"
            except Exception:
                pass
        with self._lock:
            self.batches += 1
            self.device_images += n_dev
            self.host_images += n_host
            self.device_s += seconds
            for code in route[ok].tolist():
                self.routes[code] = self.routes.get(code, 0) + 1
            if self.tuner is not None and n_dev:
                self.tuner.observe_device(seconds, n_dev)

    def report(self) -> Dict:
        from preprocess.jpeghead import ROUTE_NAMES

        rate = self.device_images / self.device_s if self.device_s > 0 else None
        return {"device_images": self.device_images, "host_images": self.host_images,
                "device_decode_s": self.device_s, "device_decode_img_per_s": rate, "timing": self.timing,
                "batches": self.batches,
                "routes": {ROUTE_NAMES.get(k, str(k)): v for k, v in sorted(self.routes.items())},
                "host_share": self.tuner.report() if self.tuner is not None else None}

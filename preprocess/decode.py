"""Bytes -> pixels: decode, resize, centre crop, written into a buffer given by the caller.

This is the workers' hot path. It imports numpy and PIL only (never torch):
workers stay light and single-threaded.

Exact mode is the reference. For the same Pillow the pixels written by
:func:`preprocess_into` are identical to::

    img = Image.open(f).convert("RGB")          # torchvision's ImageFolder loader
    img = Resize(resize, interpolation)(img)    # torchvision.transforms
    img = CenterCrop((crop_h, crop_w))(img)
    np.asarray(img)

YCbCr/RGB JPEGs are decoded by libjpeg-turbo with Pillow's own settings
(accurate integer IDCT, fancy upsampling), which gives Pillow's pixels bit for
bit and is faster: where the region decoder (:mod:`preprocess.jpegregion`) is
built, only the window that the crop of the full-image resize reads is decoded,
into an image-sized buffer (``_exact_jpeg_window``); else the whole image
through ``simplejpeg`` (``_exact_jpeg``). Everything else, and every file they
refuse, is decoded by Pillow, so failures are Pillow's.
No EXIF rotation (the loader does none). The shorter side is resized with
``Image.resize((w, h), filter)`` and the resize is skipped when the size
already matches, as torchvision does; where the crop is larger than the
resized image the outside is zeros, as torchvision's padding gives.

Fast mode (``mode="fast"``) trades bit-exactness for speed, with a measured
accuracy difference (``docs/profiling.md``, "--decode fast"; ``bench/bench_decode.py``):

- JPEGs in YCbCr, RGB or grayscale go through the region decoder
  (:mod:`preprocess.jpegregion`, a small C library over libjpeg-turbo) where
  it is built: only the window of the image that the crop's resize reads is
  decoded, the crop's box is resized in C with Pillow-SIMD's filters and
  weights (the same pixels as its ``Image.resize(size, box=...)``) and
  written as RGB into ``out``. Where it is not built, ``simplejpeg``
  decodes the whole image into a reused RGBX buffer and Pillow resizes the
  box;
- JPEGs are decoded at a reduced DCT scale (1/2, 1/4 or 1/8 only: the other
  libjpeg-turbo scales are slower than a full decode) when the scaled image
  is still at least the resize target, so the resize still shrinks it;
- CMYK/YCCK JPEGs, other formats, and files libjpeg-turbo refuses or warns
  about go through Pillow (with ``draft`` for JPEGs), so a file fails in fast
  mode exactly when it fails in exact mode;
- only the pixels inside the crop are resized (the crop of a resize is a
  resize of the matching box), which differs from exact mode by at most 1 in
  a fraction of a percent of the values at full scale.

Each mode in ``_MODES`` takes the bytes and the undecoded ``PIL.Image`` from
:func:`_open`, so that it can call ``draft`` before loading.

Bad input: every failure to decode (empty, truncated, corrupt, not an image,
decompression bomb) raises :class:`DecodeError` with a short reason. Errors
in the caller's arguments (wrong ``out`` shape, unknown interpolation) raise
``ValueError``/``TypeError`` as usual, before any decoding.

Limits: the decompression-bomb limit (``max_pixels``, else Pillow's) applies
to the decoded image and to the resized one. Only pathological files (say
1 x 1000000 pixels) reach the second; the reference would try to allocate
them and run out of memory.
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from preprocess import jpegregion
from preprocess.geometry import crop_placement, resized_size

try:  # libjpeg-turbo without Pillow's per-scanline overhead; optional (the `fast` extra)
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

__all__ = [
    "DecodeError",
    "decoder",
    "INTERPOLATIONS",
    "MODES",
    "open_rgb",
    "preprocess_into",
]

_Resampling = getattr(Image, "Resampling", Image)  # Pillow >= 9.1 has the enum

# Names as torchvision's InterpolationMode values, mapped to the PIL filters
# torchvision passes to Image.resize (transforms.functional.pil_modes_mapping).
INTERPOLATIONS: Dict[str, int] = {
    "nearest": _Resampling.NEAREST,
    "bilinear": _Resampling.BILINEAR,
    "bicubic": _Resampling.BICUBIC,
    "lanczos": _Resampling.LANCZOS,
    "box": _Resampling.BOX,
    "hamming": _Resampling.HAMMING,
}

ResizeSpec = Union[int, Sequence[int]]


class DecodeError(Exception):
    """An image that cannot be decoded; ``str(err)`` is a short human reason.

    ``reason`` is that short text ("truncated JPEG", "empty file", ...);
    ``detail`` is the underlying library message, possibly empty. Pickles
    with both, so it can cross a process boundary.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        return (type(self), (self.reason, self.detail))


def open_rgb(data: bytes, max_pixels: Optional[int] = None) -> Image.Image:
    """Decode ``data`` fully into an RGB ``PIL.Image``: torchvision's ImageFolder loader.

    Pixels are those of ``Image.open(f).convert("RGB")``: no EXIF rotation;
    an image already RGB is returned as decoded, without the copy that
    ``convert`` would make. The decode is forced here, so a truncated file
    fails here, never later.

    ``max_pixels``: refuse images with more pixels than this (a decompression
    bomb) before decoding them. ``None`` keeps Pillow's own limit, which is
    also the reference's: an error above ``2 * Image.MAX_IMAGE_PIXELS``
    (178956970 by default) and a ``DecompressionBombWarning`` above
    ``Image.MAX_IMAGE_PIXELS``. Pillow's check still runs inside
    ``Image.open``, so a ``max_pixels`` above Pillow's limit only takes effect
    in a process that sets ``Image.MAX_IMAGE_PIXELS = None`` (as the workers do).

    Raises:
        DecodeError: empty, truncated, corrupt or unsupported data, or too many pixels.
    """
    return _load_rgb(_open(data, max_pixels))


def preprocess_into(
    data: bytes,
    out: np.ndarray,
    resize: ResizeSpec,
    interpolation: str = "bilinear",
    mode: str = "exact",
    max_pixels: Optional[int] = None,
) -> None:
    """Decode ``data``, resize, centre crop, and write the pixels into ``out``.

    Args:
        data: the encoded file (JPEG, PNG, ... anything Pillow opens).
        out: writable ``uint8`` array of shape ``(crop_h, crop_w, 3)``, for
            instance a view into a shared-memory batch slot; it gives the crop
            size. Every pixel of it is written.
        resize: the shorter side after resizing (int), or an exact ``(h, w)``.
        interpolation: a key of :data:`INTERPOLATIONS`.
        mode: ``"exact"`` (identical to torchvision) or ``"fast"`` (reduced
            DCT scale, libjpeg-turbo, crop-box resize); see the module docstring.
        max_pixels: decompression-bomb limit, see :func:`open_rgb`.

    Raises:
        DecodeError: the data cannot be decoded; ``out`` may be partly written.
        ValueError, TypeError: bad arguments (checked before decoding).
    """
    _check_out(out)
    resize = _check_resize(resize)
    try:
        resample = INTERPOLATIONS[interpolation]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {interpolation!r}; expected one of {sorted(INTERPOLATIONS)}"
        ) from None
    try:
        run = _MODES[mode]
    except KeyError:
        raise ValueError(f"unknown decode mode {mode!r}; expected one of {sorted(MODES)}") from None
    run(data, out, resize, resample, max_pixels)


# --------------------------------------------------------------------------- modes


def _preprocess_exact(
    data: bytes, out: np.ndarray, resize: ResizeSpec, resample: int, max_pixels: Optional[int]
) -> None:
    """Exact mode: full decode, full resize, crop; identical to torchvision."""
    img = None
    if _EXACT_TURBO and data[:3] == b"\xff\xd8\xff":
        img = _exact_jpeg_window(data, out, resize, resample, max_pixels) if _REGION is not None else None
        if img is None:
            img = _exact_jpeg(data, max_pixels)
    if img is None:
        img = _load_rgb(_open(data, max_pixels))
    width, height = img.size
    size = resized_size(width, height, resize)
    if size != (width, height):  # torchvision returns the image untouched then
        _check_resized(size, max_pixels)
        img = img.resize(size, resample)
    _write_center_crop(img, out)


def _preprocess_fast(
    data: bytes,
    out: np.ndarray,
    resize: ResizeSpec,
    resample: int,
    max_pixels: Optional[int],
    fastdct: bool = False,
    fastupsample: bool = False,
) -> None:
    """Fast mode: reduced-DCT decode where it stays above the target, resize of the crop box only.

    The geometry is exact mode's: the resized size and the crop come from the
    full image size, and the decoded (possibly scaled) image is mapped onto
    that resized image, so only the pixel values differ, never the framing.
    ``fastdct``/``fastupsample``: libjpeg-turbo's faster, less accurate IDCT
    and chroma upsampling (``simplejpeg`` path only; measured in
    ``bench/bench_decode.py``, off by default).
    """
    if data[:3] == b"\xff\xd8\xff" and (_REGION is not None or simplejpeg is not None):
        if _fast_jpeg(data, out, resize, resample, max_pixels, fastdct, fastupsample):
            return
    img = _open(data, max_pixels)
    width, height = img.size
    size = resized_size(width, height, resize)
    _check_resized(size, max_pixels)
    scale = 1
    if img.format == "JPEG":
        # Pillow picks the largest of 8, 4, 2, 1 with (W // s, H // s) >= size: the scaled
        # image still covers the resize target. It returns the original extent in the
        # scaled image's coordinates, (W / s, H / s): a partial last DCT block is kept apart.
        try:
            got = img.draft(None, size)
        except Exception as exc:  # noqa: BLE001 -- parsing untrusted bytes, see _decode_error
            raise _decode_error(exc, img.format) from exc
        if got is not None and got[1][2] > 0:
            scale = round(width / got[1][2])
    img = _load_rgb(img)
    _write_resized_crop(img, out, (width, height), size, scale, resample)


# Header colour spaces that libjpeg-turbo converts to RGB exactly as Pillow does.
_SIMPLEJPEG_SPACES = ("YCbCr", "Gray", "RGB")

# Exact mode decodes YCbCr/RGB JPEGs through simplejpeg too: at full scale with the accurate
# integer IDCT and fancy upsampling (Pillow's own libjpeg settings) the pixels are Pillow's, bit
# for bit (tests/test_preprocess.py checks every subsampling, progressive and restart-marker
# files against Pillow, and every exactness test compares with torchvision on Pillow), and the
# decode is 1.2-1.4x faster. IMAGENET_ENGINE_EXACT_DECODER=pillow turns it off.
_EXACT_TURBO = simplejpeg is not None and os.environ.get("IMAGENET_ENGINE_EXACT_DECODER", "") != "pillow"
# Fast mode's decoder of JPEG windows, None where it is not built (preprocess/jpegregion.py).
_REGION = jpegregion.load()


def _image_limit(max_pixels: Optional[int]) -> Optional[int]:
    """The pixels a libjpeg-turbo path decodes at most (``max_pixels``, else Pillow's warning
    threshold); falsy: no limit. Over it, Pillow's checks give the reason."""
    return max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS


def _resize_limit(max_pixels: Optional[int]) -> Optional[int]:
    """The pixels a resize may output (``max_pixels``, else Pillow's error threshold); None: none."""
    if max_pixels is not None:
        return max_pixels
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None


def _turbo_takes(space: str, width: int, height: int, spaces: Sequence[str], max_pixels: Optional[int]) -> bool:
    """Whether a libjpeg-turbo path decodes this JPEG header: a colour space it converts as Pillow
    does, a real size, and under the pixel limit (over it, Pillow's checks give the reason)."""
    limit = _image_limit(max_pixels)
    return space in spaces and width >= 1 and height >= 1 and not (limit and width * height > limit)


def _exact_jpeg_window(
    data: bytes, out: np.ndarray, resize: ResizeSpec, resample: int, max_pixels: Optional[int]
) -> Optional[Image.Image]:
    """The image exact mode resizes, with only the pixels its crop reads decoded; None where
    :func:`_exact_jpeg` or Pillow must decode it instead.

    The region decoder writes the window that the centre crop of the full-image resize reads into
    an image-sized RGBX buffer, at its place; the rest of the buffer is stale. Pillow's resize of
    the whole image then computes every output pixel as before, and those inside the crop read
    window pixels only (the window holds the filter's reach plus :data:`_MARGIN`), which are the
    full decode's bit for bit; the others are cropped away. Same pixels as a full decode, without
    the inverse DCT, upsampling and colour conversion of the rest (tests/test_jpegregion.py).
    """
    if resample == _Resampling.NEAREST:
        return None  # Pillow's nearest resize is another code path: not worth a second analysis
    if not isinstance(data, bytes):
        data = bytes(data)
    header = _REGION.header(data)
    if header is None:
        return None
    width, height, space = header
    if not _turbo_takes(space, width, height, ("YCbCr", "RGB"), max_pixels):
        return None
    size = resized_size(width, height, resize)
    if size != (width, height):
        _check_resized(size, max_pixels)
    _, window = _crop_window((width, height), (width, height), size, 1, out, resample)
    if window[2] < 1 or window[3] < 1:
        return None
    buf = _scratch(width * height * 4)
    try:
        got = _REGION.decode_placed(data, window, buf, width * 4)
    except (jpegregion.RegionError, ValueError):
        return None  # simplejpeg or Pillow decodes it, or Pillow gives the reason
    if got[4:] != (width, height):
        return None
    return Image.frombuffer("RGBX", (width, height), buf, "raw", "RGBX", 0, 1)


def _exact_jpeg(data: bytes, max_pixels: Optional[int]) -> Optional[Image.Image]:
    """Pillow's decode of a YCbCr/RGB JPEG, done by libjpeg-turbo through simplejpeg; None where
    Pillow must decode it (another colour space, a file simplejpeg refuses or warns about, an
    image over the pixel limit), so failures and their reasons stay Pillow's."""
    try:
        height, width, space, _ = simplejpeg.decode_jpeg_header(data)
    except Exception:  # noqa: BLE001 -- a bad header: Pillow gives the reason
        return None
    if not _turbo_takes(space, width, height, ("YCbCr", "RGB"), max_pixels):
        return None
    try:
        pixels = simplejpeg.decode_jpeg(data, "RGB", fastdct=False, fastupsample=False, strict=True)
    except Exception:  # noqa: BLE001 -- Pillow decodes it or gives the reason
        return None
    if pixels.shape != (height, width, 3):
        return None
    return Image.frombuffer("RGB", (width, height), pixels, "raw", "RGB", 0, 1)


def _fast_jpeg(
    data: bytes,
    out: np.ndarray,
    resize: ResizeSpec,
    resample: int,
    max_pixels: Optional[int],
    fastdct: bool,
    fastupsample: bool,
) -> bool:
    """The libjpeg-turbo path of fast mode; False where Pillow must take the file instead.

    Decodes with the region decoder (:mod:`preprocess.jpegregion`: only the window the crop's
    resize reads) where it is built, in one call that also does the geometry (the same as the
    Python below: :mod:`preprocess.geometry`, :func:`_dct_scale`, :func:`_crop_window`), the resize
    and the write into ``out``; else the whole image with ``simplejpeg``. Anything they
    refuse (a corrupt, truncated or unusual file: both run libjpeg-turbo with warnings as
    errors) returns False, and Pillow then decodes it or fails it with exact mode's reason.
    Images over the pixel limit also go to Pillow, whose checks give the reason.
    """
    if not isinstance(data, bytes):
        data = bytes(data)  # ctypes and simplejpeg take bytes
    flags = (jpegregion.FASTDCT if fastdct else 0) | (jpegregion.FASTUPSAMPLE if fastupsample else 0)
    if _REGION is not None and resample != _Resampling.NEAREST and out.strides[1:] == (3, 1):
        # all of it in one call: header, geometry, window decode, resize, RGB into `out`
        limit, resized = _image_limit(max_pixels) or 0, _resize_limit(max_pixels)
        try:
            _REGION.fast_crop(data, out, resize, resample, flags, limit, -1 if resized is None else resized,
                              _scratch_all(), _scratch)
        except (jpegregion.RegionError, ValueError):
            return False  # Pillow decodes it, or gives exact mode's reason (a bomb, a bad file)
        return True
    try:
        header = _REGION.header(data) if _REGION is not None else simplejpeg.decode_jpeg_header(data)[:3]
    except Exception:  # noqa: BLE001 -- a bad header: Pillow gives the reason
        return False
    if header is None:
        return False
    height, width, space = (header[1], header[0], header[2]) if _REGION is not None else header
    if not _turbo_takes(space, width, height, _SIMPLEJPEG_SPACES, max_pixels):
        return False
    size = resized_size(width, height, resize)
    _check_resized(size, max_pixels)
    # 1/2, 1/4, 1/8 only (the others are slower than a full decode), and only while the scaled
    # image is still at least the resize target: the same choice as Pillow's draft().
    scale = _dct_scale(width, height, size)
    # libjpeg-turbo's scaled size is ceil(W / s) x ceil(H / s)
    scaled_w, scaled_h = -(-width // scale), -(-height // scale)
    if _REGION is not None:
        return _fast_jpeg_region(data, out, (width, height), (scaled_w, scaled_h), size, scale, resample, flags)
    # min_factor=s with those minimums leaves simplejpeg exactly one choice (it otherwise also
    # picks 3/8, 5/8, ... scales)
    kw = dict(min_factor=scale, min_width=scaled_w, min_height=scaled_h) if scale > 1 else {}
    try:
        pixels = simplejpeg.decode_jpeg(
            data, "RGBX", fastdct=fastdct, fastupsample=fastupsample,
            buffer=_scratch(scaled_w * scaled_h * 4), **kw
        )
    except Exception:  # noqa: BLE001 -- Pillow decodes it or gives exact mode's reason
        return False
    if pixels.shape[:2] != (scaled_h, scaled_w):
        return False  # not the scale asked for (another libjpeg-turbo?): let Pillow do it
    img = Image.frombuffer("RGBX", (scaled_w, scaled_h), pixels, "raw", "RGBX", 0, 1)
    _write_resized_crop(img, out, (width, height), size, scale, resample)
    return True


# Pillow's filter supports (ImagingResample's filters), in input pixels at scale 1: the resize of
# output pixel i reads the input within support * max(1, box / output) of its centre.
_SUPPORT = {
    _Resampling.NEAREST: 0.5, _Resampling.BOX: 0.5, _Resampling.BILINEAR: 1.0,
    _Resampling.HAMMING: 1.0, _Resampling.BICUBIC: 2.0, _Resampling.LANCZOS: 3.0,
}
# Pixels added around what the filter reads: Pillow's rounding of each filter's first and last
# input (1), and libjpeg-turbo's chroma upsampling, which sees no neighbour at a window's edge (2).
_MARGIN = 3


def _crop_window(
    full: Tuple[int, int],
    scaled: Tuple[int, int],
    size: Tuple[int, int],
    scale: int,
    out: np.ndarray,
    resample: int,
) -> Tuple[Tuple[float, float, float, float], Tuple[int, int, int, int]]:
    """The crop's box in the decoded image and the window ``(x0, y0, w, h)`` its resize reads.

    ``full`` is the image's size, ``scaled`` the decoded size (at DCT scale ``scale``), ``size`` the
    resize target, ``out`` gives the crop. The box is where the crop of the resized image lies in
    the decoded one; the window adds the filter's reach (``support * max(1, box / output)``) and
    :data:`_MARGIN` around it, clipped to the decoded image. Without a resize (the decoded image is
    the target size) the box is the crop itself. Exact mode (``scale`` 1, ``scaled == full``) and
    fast mode both decode this window.
    """
    (left, top, right, bottom), _ = crop_placement(size[0], size[1], out.shape[0], out.shape[1])
    if scaled == size:
        box, reach_x, reach_y = (float(left), float(top), float(right), float(bottom)), 0.0, 0.0
    else:
        fx, fy = full[0] / size[0] / scale, full[1] / size[1] / scale
        box = (left * fx, top * fy, right * fx, bottom * fy)
        support = _SUPPORT.get(resample, 3.0)
        reach_x, reach_y = support * max(1.0, fx), support * max(1.0, fy)
    x0 = max(0, int(math.floor(box[0] - reach_x)) - _MARGIN)
    y0 = max(0, int(math.floor(box[1] - reach_y)) - _MARGIN)
    x1 = min(scaled[0], int(math.ceil(box[2] + reach_x)) + _MARGIN)
    y1 = min(scaled[1], int(math.ceil(box[3] + reach_y)) + _MARGIN)
    return box, (x0, y0, x1 - x0, y1 - y0)


def _fast_jpeg_region(
    data: bytes,
    out: np.ndarray,
    full: Tuple[int, int],
    scaled: Tuple[int, int],
    size: Tuple[int, int],
    scale: int,
    resample: int,
    flags: int,
) -> bool:
    """Fast mode through the region decoder where its one call does not apply (the nearest filter,
    or an ``out`` whose pixels are not packed): decode the window of the (DCT-scaled) image that the
    crop's resize reads, then Pillow resizes the crop's box within it (:func:`_write_resized_crop`)."""
    _, (x0, y0, w, h) = _crop_window(full, scaled, size, scale, out, resample)
    buf = _scratch(jpegregion.window_bytes(w, h))
    try:
        x, width, y, rows, got_w, got_h = _REGION.decode(data, scale, flags, (x0, y0, w, h), buf)
    except (jpegregion.RegionError, ValueError):
        return False  # Pillow decodes it or gives exact mode's reason
    if (got_w, got_h) != scaled:
        return False  # not the scale asked for (another libjpeg-turbo?): let Pillow do it
    img = Image.frombuffer("RGBX", (width, rows), buf[: width * rows * 4], "raw", "RGBX", 0, 1)
    _write_resized_crop(img, out, full, size, scale, resample, origin=(x, y))
    return True


def _dct_scale(width: int, height: int, size: Tuple[int, int]) -> int:
    """The largest of 8, 4, 2, 1 that keeps ``(W // s, H // s)`` at least ``size`` (Pillow's rule)."""
    fit = min(width // size[0], height // size[1])
    for scale in (8, 4, 2):
        if fit >= scale:
            return scale
    return 1


_LOCAL = threading.local()


# Largest buffer _scratch keeps between images (an ImageNet image needs under 1 MiB): one huge
# image must not leave a worker holding its gigabyte for the rest of the run.
_SCRATCH_KEEP = 64 << 20


def _scratch_all() -> np.ndarray:
    """This thread's whole reusable buffer (at least 1 MiB), for a callee that says what it needs."""
    buf = getattr(_LOCAL, "buf", None)
    return buf if buf is not None else _scratch(1 << 20)


def _scratch(nbytes: int) -> np.ndarray:
    """A reusable decode buffer per thread: no fresh allocation (and page faults) per image."""
    if nbytes > _SCRATCH_KEEP:
        return np.empty(nbytes, dtype=np.uint8)  # freed with the image
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = np.empty(max(nbytes, 1 << 20), dtype=np.uint8)
        _LOCAL.buf = buf
    return buf[:nbytes]


def _write_resized_crop(
    img: Image.Image,
    out: np.ndarray,
    full: Tuple[int, int],
    size: Tuple[int, int],
    scale: int,
    resample: int,
    origin: Tuple[int, int] = (0, 0),
) -> None:
    """Write the centre crop of ``full`` resized to ``size``, resizing only the crop's box.

    ``img`` is the decoded image, ``full`` the original image size and
    ``scale`` the DCT scale it was decoded at (1: full size); pixel ``i`` of
    ``img`` covers original pixels ``[i * scale, (i + 1) * scale)``. ``img``
    may be RGB or RGBX (the X band is dropped). ``origin``: where ``img``
    starts in the decoded image when it is a window of it (the region
    decoder's), which then holds every pixel the resize reads.
    """
    crop_h, crop_w = out.shape[0], out.shape[1]
    (left, top, right, bottom), (dst_x, dst_y) = crop_placement(size[0], size[1], crop_h, crop_w)
    src_w, src_h = right - left, bottom - top
    if src_w != crop_w or src_h != crop_h:
        out.fill(0)  # the crop is larger than the image along some axis: zeros, as in exact mode
    # resized pixel x covers original [x * fx, (x + 1) * fx), decoded [x * fx / scale, ...)
    fx, fy = full[0] / size[0] / scale, full[1] / size[1] / scale
    ox, oy = origin
    if (-(-full[0] // scale), -(-full[1] // scale)) == size:
        # no resize at this scale (the image already has the target size): a plain crop
        img = img.crop((left - ox, top - oy, right - ox, bottom - oy))
    else:
        box = (left * fx - ox, top * fy - oy, right * fx - ox, bottom * fy - oy)
        img = img.resize((src_w, src_h), resample, box=box)
    # packed to RGB by Pillow (RGBX -> RGB in C), then one contiguous copy: numpy dropping the X
    # band itself (a strided copy) costs several times more
    pixels = np.frombuffer(img.tobytes("raw", "RGB"), dtype=np.uint8).reshape(src_h, src_w, 3)
    out[dst_y : dst_y + src_h, dst_x : dst_x + src_w] = pixels


def decoder(mode: str) -> str:
    """One line: what decodes JPEGs in ``mode`` in this process (run-eval's report says it)."""
    if mode == "fast":
        if _REGION is not None:
            return (f"JPEG windows by libjpeg-turbo {_REGION.turbo_version} (region decoder) with the resize "
                    f"in C; Pillow for the rest")
        why = jpegregion.status().replace("no region decoder: ", "")
        if simplejpeg is not None:
            return f"whole JPEGs by libjpeg-turbo via simplejpeg (region decoder {why}); Pillow for the rest"
        return f"Pillow with draft() (no simplejpeg; region decoder {why})"
    if _EXACT_TURBO and _REGION is not None:
        return (f"YCbCr/RGB JPEGs: the window the crop reads by libjpeg-turbo {_REGION.turbo_version} (region "
                f"decoder), Pillow's settings and resize; Pillow for the rest")
    if _EXACT_TURBO:
        return "YCbCr/RGB JPEGs by libjpeg-turbo via simplejpeg with Pillow's settings; Pillow for the rest"
    return "Pillow"


_Mode = Callable[[bytes, np.ndarray, ResizeSpec, int, Optional[int]], None]
_MODES: Dict[str, _Mode] = {"exact": _preprocess_exact, "fast": _preprocess_fast}
MODES: Tuple[str, ...] = tuple(_MODES)


# --------------------------------------------------------------------------- steps


def _check_out(out: np.ndarray) -> Tuple[int, int]:
    """Validate the output buffer where it enters; return ``(crop_h, crop_w)``."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != np.uint8 or out.ndim != 3 or out.shape[2] != 3:
        raise ValueError(
            f"out must be a uint8 array of shape (crop_h, crop_w, 3), got {out.dtype} {out.shape}"
        )
    if out.shape[0] < 1 or out.shape[1] < 1:
        raise ValueError(f"out must have a non-empty crop, got shape {out.shape}")
    if not out.flags.writeable:
        raise ValueError("out must be writable (a read-only view was given)")
    return out.shape[0], out.shape[1]


def _check_resize(resize: ResizeSpec) -> ResizeSpec:
    """Validate the resize argument where it enters; return it as an int or a tuple of ints."""
    if isinstance(resize, (int, np.integer)):
        sizes = [resize]
    elif isinstance(resize, (tuple, list)):
        sizes = list(resize)
    else:
        sizes = []
    valid = 1 <= len(sizes) <= 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in sizes
    )
    if not valid:
        raise ValueError(f"resize must be an int >= 1 or a (h, w) pair of them, got {resize!r}")
    if isinstance(resize, (int, np.integer)):
        return int(resize)
    return tuple(int(v) for v in sizes)


def _check_resized(size: Tuple[int, int], max_pixels: Optional[int]) -> None:
    """Refuse a resize whose output alone would be a decompression bomb.

    A small file can hold a 1 x 1000000 image: under the pixel limit, but
    resizing its shorter side to 256 asks for 256 x 256000000 pixels. The
    reference would try and run out of memory; we fail the image instead,
    with the same limit as for decoding (``max_pixels``, else Pillow's).
    """
    limit = _resize_limit(max_pixels)
    pixels = size[0] * size[1]
    if limit is not None and pixels > limit:
        raise DecodeError(
            f"decompression bomb: resize to {size[0]}x{size[1]} = {pixels} pixels > limit {limit}"
        )


def _write_center_crop(img: Image.Image, out: np.ndarray) -> None:
    """Write ``CenterCrop(out.shape[:2])`` of the RGB (or RGBX) ``img`` into ``out``, zeros outside."""
    width, height = img.size
    crop_h, crop_w = out.shape[0], out.shape[1]
    (left, top, right, bottom), (dst_x, dst_y) = crop_placement(width, height, crop_h, crop_w)
    src_w, src_h = right - left, bottom - top
    if src_w != crop_w or src_h != crop_h:
        # Crop larger than the image along some axis: torchvision pads with
        # zeros. Rare (images far smaller than the crop); clear everything.
        out.fill(0)
    if (left, top, right, bottom) != (0, 0, width, height):
        img = img.crop((left, top, right, bottom))
    # PIL keeps RGB as 4 bytes a pixel, so it cannot write into `out`
    # directly: tobytes() packs to RGB once (from RGB or RGBX) and the assignment copies once.
    pixels = np.frombuffer(img.tobytes("raw", "RGB"), dtype=np.uint8).reshape(src_h, src_w, 3)
    out[dst_y : dst_y + src_h, dst_x : dst_x + src_w] = pixels


def _open(data: bytes, max_pixels: Optional[int]) -> Image.Image:
    """Identify the format and read the header; pixels are not decoded yet."""
    if not data:
        raise DecodeError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 -- see _decode_error
        raise _decode_error(exc, _sniff(data)) from exc
    if max_pixels is not None:
        pixels = max(1, img.size[0]) * max(1, img.size[1])
        if pixels > max_pixels:
            raise DecodeError(
                f"decompression bomb: {pixels} pixels > limit {max_pixels}",
                f"{img.format} {img.size[0]}x{img.size[1]}",
            )
    return img


def _load_rgb(img: Image.Image) -> Image.Image:
    """Decode fully and convert to RGB, as ``img.convert("RGB")`` does (it loads first)."""
    try:
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 -- see _decode_error
        raise _decode_error(exc, img.format) from exc
    return img


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _sniff(data: bytes) -> Optional[str]:
    """The format named by the first bytes, for messages about files Pillow could not open."""
    head = bytes(data[:12])
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


def _decode_error(exc: Exception, fmt: Optional[str]) -> DecodeError:
    """Turn whatever Pillow raised while parsing untrusted bytes into a DecodeError.

    Only Pillow's parsing runs inside the ``try`` blocks that call this, and
    its plugins raise a zoo of types on malformed input (OSError, SyntaxError,
    ValueError, EOFError, struct.error, IndexError, ...), so every Exception
    there is a bad file, never a bug of ours. Our own arguments are checked
    before, and resize/crop errors are not caught.
    """
    if isinstance(exc, DecodeError):
        return exc
    detail = str(exc)
    name = fmt or "image"
    if isinstance(exc, Image.DecompressionBombError):
        match = _BOMB.search(detail)
        if match:
            return DecodeError(f"decompression bomb: {match[1]} pixels > limit {match[2]}", detail)
        return DecodeError("decompression bomb", detail)
    if isinstance(exc, getattr(Image, "UnidentifiedImageError", ())):
        return DecodeError("not an image (cannot identify image file)", detail)
    if "truncat" in detail.lower() or isinstance(exc, EOFError):
        return DecodeError(f"truncated {name}", detail)
    if isinstance(exc, MemoryError):
        return DecodeError(f"out of memory decoding {name}", detail)
    if "not supported" in detail or "unsupported" in detail.lower():
        return DecodeError(f"unsupported {name}: {detail}", detail)
    if isinstance(exc, (OSError, SyntaxError, ValueError)):
        return DecodeError(f"corrupt {name}: {detail}" if detail else f"corrupt {name}", detail)
    kind = f"{type(exc).__module__}.{type(exc).__name__}".replace("builtins.", "")
    return DecodeError(f"corrupt {name} ({kind}: {detail})", detail)

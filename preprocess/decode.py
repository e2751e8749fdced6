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
into an image-sized buffer; else the whole image through ``simplejpeg``.
Everything else, and every file they refuse, is decoded by Pillow, so failures
are Pillow's.
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

How: each mode is an ordered list of strategies (:mod:`preprocess.strategies`),
each one decoder tried on one image, writing into ``out`` or saying why it
leaves the image to the next; the last is always Pillow. The lists are built
once from the decoders this process has: ``_REGION`` (the region decoder or
None), ``simplejpeg`` (the module or None) and ``_EXACT_TURBO``, read here
only (:func:`_chain`; a test or ``bench/bench_decode.py`` replaces one to force
a path, and the lists for the new set are built then). :func:`decoder` is the
join of the list's summaries, :func:`strategies` the list itself, :func:`trace`
the path one image took. Each strategy computes one
:class:`~preprocess.cropplan.CropPlan` per image (full size, resized size, DCT
scale, window, where the crop lands).

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

import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from preprocess import jpegregion
from preprocess import strategies as _strategies
from preprocess.cropplan import dct_scale as _dct_scale  # noqa: F401 -- tests/test_fast_decode.py
from preprocess.geometry import resized_size  # noqa: F401 -- re-exported (tests use decode.resized_size)
from preprocess.pillowio import DecodeError, Resampling, check_resized, decode_error, load_rgb, open_image
from preprocess.scratch import LOCAL as _LOCAL  # noqa: F401 -- tests/test_jpegregion.py
from preprocess.scratch import SCRATCH_KEEP as _SCRATCH_KEEP  # noqa: F401
from preprocess.scratch import scratch as _scratch, scratch_all as _scratch_all  # noqa: F401 -- bench_decode
from preprocess.strategies import Request, Strategy

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
    "strategies",
    "trace",
]

# Names as torchvision's InterpolationMode values, mapped to the PIL filters
# torchvision passes to Image.resize (transforms.functional.pil_modes_mapping).
INTERPOLATIONS: Dict[str, int] = {
    "nearest": Resampling.NEAREST,
    "bilinear": Resampling.BILINEAR,
    "bicubic": Resampling.BICUBIC,
    "lanczos": Resampling.LANCZOS,
    "box": Resampling.BOX,
    "hamming": Resampling.HAMMING,
}

ResizeSpec = Union[int, Sequence[int]]

MODES: Tuple[str, ...] = ("exact", "fast")

# The decoders the strategy lists are built from (read by _chain only).
# Exact mode decodes YCbCr/RGB JPEGs through libjpeg-turbo too: at full scale with the accurate
# integer IDCT and fancy upsampling (Pillow's own libjpeg settings) the pixels are Pillow's, bit
# for bit (tests/test_preprocess.py checks every subsampling, progressive and restart-marker
# files against Pillow, and every exactness test compares with torchvision on Pillow), and the
# decode is 1.2-1.4x faster. IMAGENET_ENGINE_EXACT_DECODER=pillow turns it off.
_EXACT_TURBO = simplejpeg is not None and os.environ.get("IMAGENET_ENGINE_EXACT_DECODER", "") != "pillow"
# The region decoder, None where it is not built (preprocess/jpegregion.py).
_REGION = jpegregion.load()


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
    return load_rgb(open_image(data, max_pixels))


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
    chain, req = _request(data, out, resize, interpolation, mode, max_pixels)
    _run(chain, req)


def trace(
    data: bytes,
    out: np.ndarray,
    resize: ResizeSpec,
    interpolation: str = "bilinear",
    mode: str = "exact",
    max_pixels: Optional[int] = None,
) -> List[Tuple[str, str]]:
    """:func:`preprocess_into`, returning the path the image took: ``(strategy name, "done" or why
    it left the image)`` for each strategy tried, in order. Raises as :func:`preprocess_into`."""
    chain, req = _request(data, out, resize, interpolation, mode, max_pixels)
    path: List[Tuple[str, str]] = []
    _run(chain, req, path)
    return path


def strategies(mode: str) -> Tuple[Strategy, ...]:
    """The ordered decode strategies of ``mode`` in this process (:mod:`preprocess.strategies`)."""
    try:
        return _chain()[mode]
    except KeyError:
        raise ValueError(f"unknown decode mode {mode!r}; expected one of {sorted(MODES)}") from None


def decoder(mode: str) -> str:
    """One line: what decodes JPEGs in ``mode`` in this process (run-eval's report says it, the pixel
    cache keys on it): the summaries of the strategies that decode, in order."""
    return "; ".join(s.summary for s in strategies(mode) if s.summary)


# --------------------------------------------------------------------------- the strategy lists

_Chains = Dict[str, Tuple[Strategy, ...]]
_BUILT: Dict[tuple, _Chains] = {}
_LAST: List[object] = [None, None, None, None]  # region, simplejpeg, exact_turbo, chains


def _chain() -> _Chains:
    """The strategy lists for the decoders in this module's ``_REGION``, ``simplejpeg`` and
    ``_EXACT_TURBO``, built once per set of them."""
    last = _LAST
    if last[0] is _REGION and last[1] is simplejpeg and last[2] is _EXACT_TURBO:
        return last[3]  # type: ignore[return-value]
    key = (_REGION, simplejpeg, _EXACT_TURBO)
    chains = _BUILT.get(key)
    if chains is None:
        chains = {m: _strategies.build(m, _REGION, simplejpeg, _EXACT_TURBO, jpegregion.status) for m in MODES}
        _BUILT[key] = chains
    last[:] = [_REGION, simplejpeg, _EXACT_TURBO, chains]
    return chains


def _run(chain: Tuple[Strategy, ...], req: Request, path: Optional[List[Tuple[str, str]]] = None) -> Strategy:
    """Try the strategies in order until one has written ``req.out``; returns it."""
    for strategy in chain:
        outcome = strategy.run(req)
        if path is not None:
            path.append((strategy.name, outcome.reason))
        if outcome.done:
            return strategy
    raise AssertionError(f"no strategy decoded the image and none raised: {chain}")  # Pillow always does


def _request(data, out, resize, interpolation, mode, max_pixels) -> Tuple[Tuple[Strategy, ...], Request]:
    """Check the arguments where they enter; the mode's strategies and the image's request."""
    _check_out(out)
    resize = _check_resize(resize)
    try:
        resample = INTERPOLATIONS[interpolation]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {interpolation!r}; expected one of {sorted(INTERPOLATIONS)}"
        ) from None
    try:
        chain = _chain()[mode]
    except KeyError:
        raise ValueError(f"unknown decode mode {mode!r}; expected one of {sorted(MODES)}") from None
    return chain, Request(data, out, resize, resample, max_pixels)


# Internal entries kept for the tests and bench/bench_decode.py, which call a mode with its
# arguments already checked (fast mode with libjpeg-turbo's fast options) or one decoder.


def _preprocess_exact(data: bytes, out: np.ndarray, resize: ResizeSpec, resample: int,
                      max_pixels: Optional[int]) -> None:
    """Exact mode on checked arguments."""
    _run(_chain()["exact"], Request(data, out, resize, resample, max_pixels))


def _preprocess_fast(data: bytes, out: np.ndarray, resize: ResizeSpec, resample: int, max_pixels: Optional[int],
                     fastdct: bool = False, fastupsample: bool = False) -> None:
    """Fast mode on checked arguments. ``fastdct``/``fastupsample``: libjpeg-turbo's faster, less
    accurate IDCT and chroma upsampling (measured in ``bench/bench_decode.py``, off by default)."""
    _run(_chain()["fast"], Request(data, out, resize, resample, max_pixels, fastdct, fastupsample))


def _exact_jpeg(data: bytes, max_pixels: Optional[int]) -> Optional[Image.Image]:
    """Exact mode's simplejpeg decode of a YCbCr/RGB JPEG, or None: Pillow's (strategies.exact_jpeg_image)."""
    return _strategies.exact_jpeg_image(simplejpeg, data, max_pixels)


# the Pillow helpers under their former names (tests and benches of other modules use them)
_open, _load_rgb, _decode_error, _check_resized = open_image, load_rgb, decode_error, check_resized


# --------------------------------------------------------------------------- argument checks


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

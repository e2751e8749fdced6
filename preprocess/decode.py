"""Bytes -> pixels: decode, resize, centre crop, written into a buffer given by the caller.

This is the workers' hot path. It imports numpy and PIL only (never torch):
workers stay light and single-threaded.

Exact mode is the reference. For the same Pillow the pixels written by
:func:`preprocess_into` are identical to::

    img = Image.open(f).convert("RGB")          # torchvision's ImageFolder loader
    img = Resize(resize, interpolation)(img)    # torchvision.transforms
    img = CenterCrop((crop_h, crop_w))(img)
    np.asarray(img)

No EXIF rotation (the loader does none). The shorter side is resized with
``Image.resize((w, h), filter)`` and the resize is skipped when the size
already matches, as torchvision does; where the crop is larger than the
resized image the outside is zeros, as torchvision's padding gives.

Other decode modes (a fast mode that decodes at a reduced DCT scale and
resizes only the crop box) plug into ``_MODES``; each takes the undecoded
``PIL.Image`` from :func:`_open` so that it can call ``draft`` before loading.

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
import re
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from preprocess.geometry import crop_placement, resized_size

__all__ = [
    "DecodeError",
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
        mode: ``"exact"`` (identical to torchvision, see the module docstring).
        max_pixels: decompression-bomb limit, see :func:`open_rgb`.

    Raises:
        DecodeError: the data cannot be decoded; ``out`` may be partly written.
        ValueError, TypeError: bad arguments (checked before decoding).
        NotImplementedError: a decode mode that is planned but not written yet.
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
        if mode in _PLANNED_MODES:
            raise NotImplementedError(
                f"decode mode {mode!r} is not implemented yet; use 'exact'"
            ) from None
        raise ValueError(f"unknown decode mode {mode!r}; expected one of {sorted(MODES)}") from None
    run(_open(data, max_pixels), out, resize, resample, max_pixels)


# --------------------------------------------------------------------------- modes


def _preprocess_exact(
    img: Image.Image, out: np.ndarray, resize: ResizeSpec, resample: int, max_pixels: Optional[int]
) -> None:
    """Exact mode: full decode, full resize, crop; identical to torchvision."""
    img = _load_rgb(img)
    width, height = img.size
    size = resized_size(width, height, resize)
    if size != (width, height):  # torchvision returns the image untouched then
        _check_resized(size, max_pixels)
        img = img.resize(size, resample)
    _write_center_crop(img, out)


_Mode = Callable[[Image.Image, np.ndarray, ResizeSpec, int, Optional[int]], None]
_MODES: Dict[str, _Mode] = {"exact": _preprocess_exact}
_PLANNED_MODES = ("fast",)
MODES: Tuple[str, ...] = tuple(_MODES) + _PLANNED_MODES


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
    limit = max_pixels
    if limit is None and Image.MAX_IMAGE_PIXELS:
        limit = 2 * Image.MAX_IMAGE_PIXELS
    pixels = size[0] * size[1]
    if limit is not None and pixels > limit:
        raise DecodeError(
            f"decompression bomb: resize to {size[0]}x{size[1]} = {pixels} pixels > limit {limit}"
        )


def _write_center_crop(img: Image.Image, out: np.ndarray) -> None:
    """Write ``CenterCrop(out.shape[:2])`` of the RGB ``img`` into ``out``, zeros outside."""
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
    # directly: tobytes() packs to RGB once and the assignment copies once.
    pixels = np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(src_h, src_w, 3)
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

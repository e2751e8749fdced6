"""Pillow's side of decoding: open, load as RGB, the pixel limits, and failures as DecodeError.

Every decode strategy (:mod:`preprocess.strategies`) ends in Pillow for the files the libjpeg-turbo
paths leave, so failures and their reasons are always Pillow's: this module turns whatever
Pillow raised while parsing untrusted bytes into a :class:`DecodeError` with a short reason.
"""

from __future__ import annotations

import io
import re
from typing import Optional, Tuple

from PIL import Image

__all__ = ["DecodeError", "Resampling", "check_resized", "decode_error", "image_limit", "load_rgb",
           "open_image", "resize_limit", "sniff"]

Resampling = getattr(Image, "Resampling", Image)  # Pillow >= 9.1 has the enum


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


# Defined here so that the strategies can raise it without importing preprocess.decode; it is
# decode's public class (and pickles under that name).
DecodeError.__module__ = "preprocess.decode"


def image_limit(max_pixels: Optional[int]) -> Optional[int]:
    """The pixels a libjpeg-turbo path decodes at most (``max_pixels``, else Pillow's warning
    threshold); falsy: no limit. Over it, Pillow's checks give the reason."""
    return max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS


def resize_limit(max_pixels: Optional[int]) -> Optional[int]:
    """The pixels a resize may output (``max_pixels``, else Pillow's error threshold); None: none."""
    if max_pixels is not None:
        return max_pixels
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None


def check_resized(size: Tuple[int, int], max_pixels: Optional[int]) -> None:
    """Refuse a resize whose output alone would be a decompression bomb.

    A small file can hold a 1 x 1000000 image: under the pixel limit, but
    resizing its shorter side to 256 asks for 256 x 256000000 pixels. The
    reference would try and run out of memory; we fail the image instead,
    with the same limit as for decoding (``max_pixels``, else Pillow's).
    """
    limit = resize_limit(max_pixels)
    pixels = size[0] * size[1]
    if limit is not None and pixels > limit:
        raise DecodeError(
            f"decompression bomb: resize to {size[0]}x{size[1]} = {pixels} pixels > limit {limit}"
        )


def open_image(data: bytes, max_pixels: Optional[int]) -> Image.Image:
    """Identify the format and read the header; pixels are not decoded yet."""
    if not data:
        raise DecodeError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 -- see decode_error
        raise decode_error(exc, sniff(data)) from exc
    if max_pixels is not None:
        pixels = max(1, img.size[0]) * max(1, img.size[1])
        if pixels > max_pixels:
            raise DecodeError(
                f"decompression bomb: {pixels} pixels > limit {max_pixels}",
                f"{img.format} {img.size[0]}x{img.size[1]}",
            )
    return img


def load_rgb(img: Image.Image) -> Image.Image:
    """Decode fully and convert to RGB, as ``img.convert("RGB")`` does (it loads first)."""
    try:
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 -- see decode_error
        raise decode_error(exc, img.format) from exc
    return img


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff(data: bytes) -> Optional[str]:
    """The format named by the first bytes, for messages about files Pillow could not open."""
    head = bytes(data[:12])
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


def decode_error(exc: Exception, fmt: Optional[str]) -> DecodeError:
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

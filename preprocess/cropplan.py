"""One image's crop plan: where the centre crop of its resize lies in the decoded pixels.

A :class:`CropPlan` is computed once per image by the decode strategy that takes it
(:mod:`preprocess.strategies`) from the image's size, the request (resize, crop, filter) and the
DCT scale it decodes at; everything after that reads it: the window a region decode asks for, the
box a fast-mode resize reads, and where the crop lands in ``out``. The arithmetic is
:mod:`preprocess.geometry`'s (torchvision's), and the float expressions are those the C code of
``_jpegregion.c`` (``ie_fast_crop``) mirrors, so keep them as they are.

Coordinates: PIL order ``(width, height)`` for sizes; a window is ``(x0, y0, w, h)`` in the decoded
(DCT-scaled) image.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
from PIL import Image

from preprocess.geometry import crop_placement
from preprocess.pillowio import Resampling

__all__ = ["CropPlan", "dct_scale", "write_exact_crop", "write_resized_crop"]

# Pillow's filter supports (ImagingResample's filters), in input pixels at scale 1: the resize of
# output pixel i reads the input within support * max(1, box / output) of its centre.
SUPPORT = {
    Resampling.NEAREST: 0.5, Resampling.BOX: 0.5, Resampling.BILINEAR: 1.0,
    Resampling.HAMMING: 1.0, Resampling.BICUBIC: 2.0, Resampling.LANCZOS: 3.0,
}
# Pixels added around what the filter reads: Pillow's rounding of each filter's first and last
# input (1), and libjpeg-turbo's chroma upsampling, which sees no neighbour at a window's edge (2).
MARGIN = 3


def dct_scale(width: int, height: int, size: Tuple[int, int]) -> int:
    """The largest of 8, 4, 2, 1 that keeps ``(W // s, H // s)`` at least ``size`` (Pillow's rule)."""
    fit = min(width // size[0], height // size[1])
    for scale in (8, 4, 2):
        if fit >= scale:
            return scale
    return 1


class CropPlan:
    """The geometry of one image's preprocessing, computed once.

    Attributes:
        full: the image's size ``(W, H)``.
        size: the resize target ``(w, h)`` (:func:`preprocess.geometry.resized_size`).
        scale: the DCT scale it is decoded at (1: full size); pixel ``i`` of the decoded image
            covers original pixels ``[i * scale, (i + 1) * scale)``.
        scaled: the decoded size, ``ceil(full / scale)`` as libjpeg-turbo gives it.
        resample: the Pillow filter.
        src, dst: the crop's part of the resized image (a PIL box, clipped to it) and where that
            lands in ``out`` (:func:`preprocess.geometry.crop_placement`); ``pads``: the crop is
            larger than the resized image along some axis (the rest of ``out`` is zeros).
        resizes: the decoded image is not already the target size.
        box: where ``src`` lies in the decoded image (floats; ``src`` itself without a resize).
        window: ``(x0, y0, w, h)``, the part of the decoded image the resize of ``box`` reads: the
            filter's reach (``support * max(1, box / output)``) and :data:`MARGIN` around ``box``,
            clipped to the decoded image. Exact mode (``scale`` 1) and fast mode decode this.
    """

    __slots__ = ("full", "size", "scale", "scaled", "resample", "src", "dst", "pads", "resizes", "box",
                 "window")

    def __init__(self, full: Tuple[int, int], size: Tuple[int, int], scale: int, crop: Tuple[int, int],
                 resample: int) -> None:
        self.full, self.size, self.scale, self.resample = full, size, scale, resample
        self.scaled = (-(-full[0] // scale), -(-full[1] // scale))
        crop_h, crop_w = crop
        (left, top, right, bottom), self.dst = crop_placement(size[0], size[1], crop_h, crop_w)
        self.src = (left, top, right, bottom)
        self.pads = right - left != crop_w or bottom - top != crop_h
        self.resizes = self.scaled != size
        if not self.resizes:
            self.box = (float(left), float(top), float(right), float(bottom))
            reach_x = reach_y = 0.0
        else:
            # resized pixel x covers original [x * fx, (x + 1) * fx), decoded [x * fx / scale, ...)
            fx, fy = full[0] / size[0] / scale, full[1] / size[1] / scale
            self.box = (left * fx, top * fy, right * fx, bottom * fy)
            support = SUPPORT.get(resample, 3.0)
            reach_x, reach_y = support * max(1.0, fx), support * max(1.0, fy)
        box = self.box
        x0 = max(0, int(math.floor(box[0] - reach_x)) - MARGIN)
        y0 = max(0, int(math.floor(box[1] - reach_y)) - MARGIN)
        x1 = min(self.scaled[0], int(math.ceil(box[2] + reach_x)) + MARGIN)
        y1 = min(self.scaled[1], int(math.ceil(box[3] + reach_y)) + MARGIN)
        self.window = (x0, y0, x1 - x0, y1 - y0)

    def __repr__(self) -> str:
        return (f"CropPlan(full={self.full}, size={self.size}, scale={self.scale}, window={self.window}, "
                f"src={self.src}, dst={self.dst})")


def _put(img: Image.Image, out: np.ndarray, plan: CropPlan) -> None:
    """Write ``img`` (the crop's pixels, RGB or RGBX) at ``plan.dst`` in ``out``."""
    left, top, right, bottom = plan.src
    src_w, src_h = right - left, bottom - top
    dst_x, dst_y = plan.dst
    # PIL keeps RGB as 4 bytes a pixel, so it cannot write into `out` directly: tobytes() packs to
    # RGB once (from RGB or RGBX, in C) and the assignment copies once; numpy dropping the X band
    # itself (a strided copy) costs several times more
    pixels = np.frombuffer(img.tobytes("raw", "RGB"), dtype=np.uint8).reshape(src_h, src_w, 3)
    out[dst_y : dst_y + src_h, dst_x : dst_x + src_w] = pixels


def write_resized_crop(img: Image.Image, out: np.ndarray, plan: CropPlan, origin: Tuple[int, int] = (0, 0)) -> None:
    """Fast mode: write the crop of ``plan``, resizing only its box of the decoded image ``img``.

    ``img`` may be RGB or RGBX (the X band is dropped). ``origin``: where ``img`` starts in the
    decoded image when it is a window of it (the region decoder's), which then holds every pixel
    the resize reads.
    """
    if plan.pads:
        out.fill(0)  # the crop is larger than the image along some axis: zeros, as in exact mode
    left, top, right, bottom = plan.src
    ox, oy = origin
    if not plan.resizes:  # the image already has the target size at this scale: a plain crop
        img = img.crop((left - ox, top - oy, right - ox, bottom - oy))
    else:
        bx0, by0, bx1, by1 = plan.box
        img = img.resize((right - left, bottom - top), plan.resample, box=(bx0 - ox, by0 - oy, bx1 - ox, by1 - oy))
    _put(img, out, plan)


def write_exact_crop(img: Image.Image, out: np.ndarray, plan: CropPlan) -> None:
    """Exact mode: ``Resize`` of the whole decoded image ``img`` (skipped where it already has the
    target size, as torchvision does), then ``CenterCrop`` written into ``out``, zeros outside.
    ``img`` is the full-size image (``plan.scale`` 1); the caller has checked the resize's size."""
    if plan.resizes:
        img = img.resize(plan.size, plan.resample)
    if plan.pads:
        # Crop larger than the image along some axis: torchvision pads with zeros. Rare (images far
        # smaller than the crop); clear everything.
        out.fill(0)
    if plan.src != (0, 0) + plan.size:
        img = img.crop(plan.src)
    _put(img, out, plan)

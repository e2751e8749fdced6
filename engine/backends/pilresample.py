"""Pillow's resampling (libImaging/Resample.c) on uint8 tensors, for `--device-resize pil`.

Pillow resizes in two passes, horizontal then vertical, each with per-output-pixel coefficients
in 22-bit fixed point, an int32 accumulator starting at 1 << 21 and a clip to 0..255 after each
pass. The coefficients are computed here in float64 in the same order as the C code (so they are
the same numbers), and each pass is a gather of the taps and an integer multiply-add: the same
integers, so the same pixels. Only the rows and columns the centre crop keeps are computed.

`pil_resample(img, new_w, new_h, box, interpolation)` is the crop `box` of Pillow's
`img.resize((new_w, new_h), filter)`; the device decode path (engine/backends/gpudecode.py
`resize_crop_into`) calls it, so the same decoded pixels give exact mode's crop bit for bit
(tests/test_device_decode.py). Bilinear and bicubic only (the filters the tensor path has).
"""

from __future__ import annotations

import functools
import math
from typing import Tuple

import numpy as np
import torch

__all__ = ["PIL_FILTERS", "pil_coefficients", "pil_resample"]

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

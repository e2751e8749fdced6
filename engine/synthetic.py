"""Synthetic ImageNet-like JPEG datasets for tests, demos and benchmarks.

The images look and compress like photographs rather than noise: a smooth
background gradient, soft-edged blobs and shapes (one large "object" near the
centre), some hard edges, texture that varies over the image, and mild sensor
noise. A 500x375 image at quality 90 is about 90-115 KB (ImageNet's are
100-150 KB).

The class is visible in the content: the background and the central object
take a hue that depends on the label (``_class_hue``), so a tiny model could
in principle learn it.

Sizes, modes and encodings are drawn like the ImageNet validation set: mostly
500x375 and 500x333 landscape, some portrait, a few over 1000 px and a few
under 224 px on a side; a few grayscale (mode L), CMYK and progressive JPEGs.
Everything is a function of the seed: the same seed gives the same bytes, with
any number of worker processes (each image has its own generator, seeded from
``(seed, index)``), for a given Pillow build: pillow-simd resamples slightly
differently from stock Pillow, so the two give slightly different pixels (stock
Pillow 11.3 with numpy 2.0 and stock Pillow 13.0 with numpy 2.4 gave the same
bytes).

Layouts:
    folder  OUT/<wnid>/ILSVRC2012_val_00000001.JPEG  (ImageFolder; label = class index)
    flat    OUT/ILSVRC2012_val_00000001.JPEG + OUT/val_label.txt ("<name> <label>" lines)

Imports numpy and PIL only (no torch).
"""

from __future__ import annotations

import io
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageChops, ImageDraw

__all__ = ["LAYOUTS", "SyntheticImage", "make_dataset", "make_image", "plan_dataset", "encode_jpeg"]

LAYOUTS = ("folder", "flat")
LABEL_FILE = "val_label.txt"
FILE_PATTERN = "ILSVRC2012_val_%08d.JPEG"

_CLASSES_TSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "imagenet_classes.tsv")

# Fractions of special images, drawn independently per image. In a dataset of
# at least _FORCE_KINDS_MIN images each kind appears at least once.
P_GRAYSCALE = 0.025
P_CMYK = 0.015
P_PROGRESSIVE = 0.06
_FORCE_KINDS_MIN = 20
_FORCE_SIZES_MIN = 50

# (probability, kind) of the size classes; see _draw_size.
_SIZE_TABLE = (
    (0.46, "500x375"),
    (0.12, "500x333"),
    (0.08, "landscape-500"),
    (0.09, "375x500"),
    (0.04, "333x500"),
    (0.05, "portrait-500"),
    (0.095, "medium"),
    (0.03, "large"),
    (0.035, "small"),
)


@dataclass(frozen=True)
class SyntheticImage:
    """What to draw for one image of a dataset; ``index`` counts from 1 like ImageNet's files."""

    index: int
    label: int
    width: int
    height: int
    mode: str  # JPEG colour mode: "RGB", "L" or "CMYK"
    progressive: bool

    @property
    def filename(self) -> str:
        return FILE_PATTERN % self.index


def plan_dataset(images: int, classes: int, seed: int = 0) -> List[SyntheticImage]:
    """Draw labels, sizes and encodings of ``images`` images from ``seed`` (cheap; no pixels).

    Labels are balanced like ImageNet val (each class ``images // classes`` or
    one more times) and shuffled, so classes are mixed over indices.
    """
    if images < 0:
        raise ValueError(f"images must be >= 0, got {images}")
    if not 1 <= classes <= 1000:
        raise ValueError(f"classes must be between 1 and 1000 (ImageNet-1k), got {classes}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(images) % classes)
    sizes = [_draw_size(rng) for _ in range(images)]
    u = rng.random((images, 3))
    gray = u[:, 0] < P_GRAYSCALE
    cmyk = (u[:, 1] < P_CMYK) & ~gray
    progressive = u[:, 2] < P_PROGRESSIVE
    if images >= _FORCE_KINDS_MIN:
        # At least one of each kind, at distinct random places.
        spots = rng.choice(images, size=3, replace=False)
        if not gray.any():
            gray[spots[0]], cmyk[spots[0]] = True, False
        if not cmyk.any():
            cmyk[spots[1]], gray[spots[1]] = True, False
        if not progressive.any():
            progressive[spots[2]] = True
    if images >= _FORCE_SIZES_MIN:
        spots = rng.choice(images, size=2, replace=False)
        if not any(min(s) < 224 for s in sizes):
            sizes[spots[0]] = _draw_size(rng, "small")
        if not any(max(s) > 1000 for s in sizes):
            sizes[spots[1]] = _draw_size(rng, "large")
    plan = []
    for i in range(images):
        mode = "L" if gray[i] else "CMYK" if cmyk[i] else "RGB"
        w, h = sizes[i]
        plan.append(SyntheticImage(i + 1, int(labels[i]), w, h, mode, bool(progressive[i])))
    return plan


def make_dataset(
    out: str,
    images: int,
    classes: int,
    layout: str = "folder",
    seed: int = 0,
    quality: int = 90,
    workers: Optional[int] = None,
) -> List[Tuple[str, int]]:
    """Write a synthetic dataset under ``out``; return ``[(relative_path, label), ...]`` in index order.

    ``relative_path`` uses ``/``. ``workers``: processes to draw with (default:
    the CPU count, at most 8; small datasets are drawn in this process). The
    bytes do not depend on ``workers``. Files of the same names are
    overwritten; other files already in ``out`` are left alone.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be between 1 and 100, got {quality}")
    if layout == "folder" and images < classes:
        raise ValueError(
            f"layout 'folder' needs at least one image per class ({images} images < {classes} "
            "classes): ImageFolder rejects empty class folders and would renumber the classes. "
            "Use more images, fewer classes, or --layout flat."
        )
    plan = plan_dataset(images, classes, seed)
    wnids = _wnids(classes)
    paths = []
    for spec in plan:
        if layout == "folder":
            paths.append(f"{wnids[spec.label]}/{spec.filename}")
        else:
            paths.append(spec.filename)
    os.makedirs(out, exist_ok=True)
    if layout == "folder":
        for wnid in sorted(set(wnids[s.label] for s in plan)):
            os.makedirs(os.path.join(out, wnid), exist_ok=True)

    jobs = [(spec, os.path.join(out, path), seed, quality) for spec, path in zip(plan, paths)]
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    if workers <= 1 or len(jobs) < 32:
        for job in jobs:
            _write_one(job)
    else:
        chunk = max(1, min(16, len(jobs) // (4 * workers)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(_write_one, jobs, chunksize=chunk):
                pass

    if layout == "flat":
        with open(os.path.join(out, LABEL_FILE), "w", encoding="utf-8") as f:
            for spec in plan:
                f.write(f"{spec.filename} {spec.label}\n")
    return [(path, spec.label) for spec, path in zip(plan, paths)]


def make_image(
    rng: np.random.Generator,
    width: int,
    height: int,
    label: int,
    detail: float = 1.0,
) -> Image.Image:
    """Draw one natural-looking RGB image of ``width x height`` whose hues depend on ``label``.

    ``detail`` in [0, 1] scales the texture and grain (1: about 100 KB for a
    500x375 JPEG at quality 90; 0: smooth shapes only).
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    hue = _class_hue(label)
    # 1. Colour layout at 1/8 resolution, vectorised in float32: background
    #    gradient, soft blobs and shapes, one central object in the class hue.
    lw, lh = max(4, -(-width // 8)), max(4, -(-height // 8))
    xs = ((np.arange(lw, dtype=np.float32) + 0.5) / lw)[None, :]
    ys = ((np.arange(lh, dtype=np.float32) + 0.5) / lh)[:, None]
    angle = rng.uniform(0, 2 * math.pi)
    t = xs * math.cos(angle) + ys * math.sin(angle)
    t = ((t - t.min()) / max(float(t.max() - t.min()), 1e-6))[..., None]
    c1 = _hsv(hue + rng.normal(0, 0.03), rng.uniform(0.25, 0.7), rng.uniform(0.45, 0.95))
    c2 = _hsv(hue + rng.normal(0, 0.08), rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.6))
    canvas = c1 * (1 - t) + c2 * t + _smooth_field(rng, lh, lw, 4, 3) * rng.uniform(10, 30)

    aspect = width / height
    for i in range(int(rng.integers(3, 9))):
        if i == 0:  # the object: large, central-ish, class hue
            cx, cy = rng.normal(0.5, 0.08, 2)
            rx, ry = rng.uniform(0.18, 0.35, 2)
            color = _hsv(hue + rng.normal(0, 0.02), rng.uniform(0.5, 0.95), rng.uniform(0.4, 1.0))
        else:
            cx, cy = rng.uniform(-0.1, 1.1, 2)
            rx, ry = rng.uniform(0.04, 0.3, 2)
            h = hue + rng.normal(0, 0.1) if rng.random() < 0.5 else rng.random()
            color = _hsv(h, rng.uniform(0.1, 0.9), rng.uniform(0.1, 1.0))
        theta = rng.uniform(0, math.pi)
        cos, sin = math.cos(theta), math.sin(theta)
        dx, dy = (xs - cx) * aspect, ys - cy
        u = (dx * cos + dy * sin) / (rx * aspect)
        v = (dy * cos - dx * sin) / ry
        shape = rng.integers(3)
        if shape == 0:
            d = np.sqrt(u * u + v * v)  # ellipse
        elif shape == 1:
            d = np.maximum(np.abs(u), np.abs(v))  # rectangle
        else:
            d = np.abs(u) + np.abs(v)  # diamond
        soft = rng.uniform(0.03, 0.4)
        mask = (np.clip((1.0 - d) * (1.0 / soft), 0.0, 1.0) * rng.uniform(0.6, 1.0))[..., None]
        shade = 1.0 + (0.25 * rng.uniform(-1, 1)) * v[..., None]  # a little shading
        canvas += mask * (color * shade - canvas)

    low = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    img = low.resize((width, height), Image.BILINEAR)

    # 2. Hard edges at full resolution: clutter (leaves, stones, marks) and a
    #    few lines and polygons.
    draw = ImageDraw.Draw(img)
    scale = max(width, height)
    for _ in range(int(rng.integers(6, 24))):
        h = hue + rng.normal(0, 0.12) if rng.random() < 0.5 else rng.random()
        col = _hsv_ink(h, rng.uniform(0.1, 0.8), rng.uniform(0.1, 0.95))
        x, y = rng.uniform(0, 1, 2) * (width, height)
        r = scale * rng.uniform(0.005, 0.04)
        if rng.random() < 0.5:
            q = rng.uniform(0.3, 1.0)
            draw.ellipse((x - r, y - r * q, x + r, y + r * q), fill=col)
        else:
            pts = rng.normal(0, r, (int(rng.integers(3, 6)), 2)) + (x, y)
            draw.polygon(pts.ravel().tolist(), fill=col)
    for _ in range(int(rng.integers(0, 7))):
        col = _hsv_ink(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.05, 0.9))
        if rng.random() < 0.6:
            pts = rng.uniform(0, 1, (2, 2)) * (width, height)
            draw.line(pts.ravel().tolist(), fill=col, width=int(rng.integers(1, max(2, scale // 120))))
        else:
            c = rng.uniform(0, 1, 2) * (width, height)
            pts = c + rng.normal(0, scale * 0.06, (int(rng.integers(3, 7)), 2))
            draw.polygon(pts.ravel().tolist(), fill=col)
    if detail <= 0:
        return img

    # 3. Texture whose strength varies over the image (sky smooth, foliage
    #    busy), with fine grain, in luma like a camera's noise. It comes from a
    #    fixed bank (_texture_bank) at a random offset: fresh full-size noise
    #    for every image would cost more than everything else together.
    lo, hi = _STRENGTH
    strength = np.clip(_smooth_field(rng, 4, 4, 3, 1)[..., 0] * 0.5 + 0.55, 0.0, 1.0) * (hi - lo) + lo
    strength *= 255 * min(detail, 1.0)
    strength_img = Image.fromarray(strength.astype(np.uint8), "L").resize((width, height), Image.BILINEAR)
    texture = _bank_crop(rng, _texture_bank(), height, width)
    luma = np.multiply(texture, np.asarray(strength_img), dtype=np.int32)
    luma >>= 8
    luma += 128
    np.clip(luma, 0, 255, out=luma)
    luma_img = Image.fromarray(luma.astype(np.uint8), "L")
    # (img + luma - 128) per channel, clipped: one pass in C.
    return ImageChops.add(img, Image.merge("RGB", (luma_img, luma_img, luma_img)), 1.0, -128)


def encode_jpeg(img: Image.Image, quality: int = 90, mode: str = "RGB", progressive: bool = False) -> bytes:
    """Encode an RGB image as a JPEG in colour ``mode`` ("RGB", "L" or "CMYK")."""
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, progressive=progressive)
    return buf.getvalue()


# --------------------------------------------------------------------------- helpers


def _write_one(job: Tuple[SyntheticImage, str, int, int]) -> int:
    spec, path, seed, quality = job
    rng = np.random.default_rng([seed, spec.index])
    img = make_image(rng, spec.width, spec.height, spec.label)
    data = encode_jpeg(img, quality, spec.mode, spec.progressive)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def _draw_size(rng: np.random.Generator, kind: Optional[str] = None) -> Tuple[int, int]:
    """One ``(width, height)`` drawn like ImageNet val's sizes."""
    if kind is None:
        u, acc = rng.random(), 0.0
        for p, kind in _SIZE_TABLE:  # noqa: B007 (the kind drawn is used after the loop)
            acc += p
            if u < acc:
                break
    if kind == "500x375":
        return 500, 375
    if kind == "500x333":
        return 500, 333
    if kind == "375x500":
        return 375, 500
    if kind == "333x500":
        return 333, 500
    if kind == "landscape-500":
        return 500, int(rng.integers(250, 500))
    if kind == "portrait-500":
        return int(rng.integers(250, 500)), 500
    if kind == "medium":  # long side 250-499, any orientation
        long = int(rng.integers(250, 500))
        short = max(224, int(long * rng.uniform(0.6, 1.0)))
        return _orient(rng, long, short, 0.7)
    if kind == "large":  # long side over 1000 px
        long = int(rng.integers(1001, 1601))
        short = int(long * (0.75 if rng.random() < 0.6 else rng.uniform(0.55, 0.9)))
        return _orient(rng, long, short, 0.7)
    if kind == "small":  # a side under 224 px
        short = int(rng.integers(48, 224))
        long = max(short, int(short * rng.uniform(1.0, 1.6)))
        return _orient(rng, long, short, 0.7)
    raise ValueError(f"unknown size kind {kind!r}")


def _orient(rng: np.random.Generator, long: int, short: int, p_landscape: float) -> Tuple[int, int]:
    return (long, short) if rng.random() < p_landscape else (short, long)


def _class_hue(label: int) -> float:
    """A hue in [0, 1) for the class: golden-ratio steps, so neighbouring labels differ."""
    return (label * 0.6180339887498949 + 0.05) % 1.0


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """HSV in [0, 1] -> RGB float32 in [0, 255]."""
    h = (h % 1.0) * 6.0
    i = int(h) % 6
    f = h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255.0


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int, channels: int) -> np.ndarray:
    """A smooth random field of about unit amplitude, shape ``(h, w, channels)``, float32.

    Coarse ``cells x cells`` noise, upsampled bilinearly by PIL (mode F).
    """
    grid = rng.standard_normal((channels, cells, cells), dtype=np.float32)
    planes = [np.asarray(Image.fromarray(g, "F").resize((w, h), Image.BILINEAR)) for g in grid]
    return np.stack(planes, axis=-1)


def _hsv_ink(h: float, s: float, v: float) -> Tuple[int, int, int]:
    r, g, b = _hsv(h, s, v)
    return int(r), int(g), int(b)


_BANK_SIZE = 1024
# Texture bank recipe. Smooth octaves: (downscale, amplitude in grey levels).
# Stepped octaves, floor() of smooth noise: (downscale, frequency, step
# height); they give patches with sharp edges like gravel, bark or fabric.
# Together they set the bytes per image (about 100 KB for 500x375 at q90).
_SMOOTH_OCTAVES = ((1, 5.0), (2, 8.0), (8, 10.0))
_STEPPED_OCTAVES = ((3, 1.2, 50.0), (6, 1.0, 40.0))
_STRENGTH = (0.35, 1.0)  # texture strength over an image, from smooth (sky) to busy (foliage)
_BANK: Optional[np.ndarray] = None


def _texture_bank() -> np.ndarray:
    """A fixed int16 luma texture around 0, ``_BANK_SIZE`` square, built once per process.

    From a constant seed, so it is the same in every process and an image does
    not depend on which process draws it; read-only.
    """
    global _BANK
    if _BANK is None:
        rng = np.random.default_rng(20120)
        n = _BANK_SIZE

        def octave(factor: int) -> np.ndarray:
            small = rng.standard_normal((n // factor, n // factor), dtype=np.float32)
            return np.asarray(Image.fromarray(small, "F").resize((n, n), Image.BICUBIC))

        bank = np.zeros((n, n), dtype=np.float32)
        for factor, amp in _SMOOTH_OCTAVES:
            bank += octave(factor) * amp
        for factor, freq, step in _STEPPED_OCTAVES:
            bank += np.floor(octave(factor) * freq) * step
        bank = bank.round().astype(np.int16)
        bank.flags.writeable = False
        _BANK = bank
    return _BANK


def _bank_crop(rng: np.random.Generator, bank: np.ndarray, height: int, width: int) -> np.ndarray:
    """A ``height x width`` window of ``bank`` at a random offset: a view when it fits, else wrapped."""
    n = bank.shape[0]
    y = int(rng.integers(0, n - height + 1)) if height <= n else int(rng.integers(0, n))
    x = int(rng.integers(0, n - width + 1)) if width <= n else int(rng.integers(0, n))
    if height <= n and width <= n:
        return bank[y : y + height, x : x + width]
    rows = np.arange(y, y + height) % n
    cols = np.arange(x, x + width) % n
    return bank[rows[:, None], cols[None, :]]


def _wnids(classes: int) -> List[str]:
    """The first ``classes`` ImageNet wnids, in class-index order, from the packaged tsv."""
    wnids: List[str] = []
    with open(_CLASSES_TSV, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            wnids.append(line.split("\t")[1])
            if len(wnids) == classes:
                break
    if len(wnids) < classes:
        raise ValueError(f"{_CLASSES_TSV} lists {len(wnids)} classes, fewer than {classes}")
    return wnids

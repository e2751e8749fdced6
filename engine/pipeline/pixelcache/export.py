"""`make-cache --export-bin`: the cache's rows as the ModelZoo's offline tools take them."""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

import numpy as np

from engine.pipeline.pixelcache.cache import PixelCache
from engine.pipeline.pixelcache.format import HIT_OK, PixelCacheError


def export_bin(cache: PixelCache, dataset, out_dir: str, fmt: str = "uint8-hwc", mean=None, std=None,
               progress: Optional[Callable[[int], None]] = None) -> int:
    """Write the ModelZoo layout: one raw `.bin` per cached image, named by the image's stem
    (uint8 HWC, or float32 NCHW normalised as (x/255 - mean)/std), plus `info` files. Returns the
    number of .bin files written; images that failed or are not in the cache are not exported."""
    if fmt not in ("uint8-hwc", "float32-nchw"):
        raise PixelCacheError(f"--export-bin format {fmt!r} is not one of uint8-hwc, float32-nchw")
    if fmt == "float32-nchw":
        if mean is None or std is None:
            raise PixelCacheError("float32-nchw export needs --mean and --std")
        m = np.asarray(mean, np.float32).reshape(3, 1, 1)
        s = np.asarray(std, np.float32).reshape(3, 1, 1)
    os.makedirs(out_dir, exist_ok=True)
    h, w = cache.shape[:2]
    used: Dict[str, int] = {}
    info_lines: List[str] = []
    image_lines: List[str] = []
    written = 0
    step = 256
    for lo in range(0, len(dataset), step):
        hi = min(len(dataset), lo + step)
        cache.check(lo, hi)
        for i in range(lo, hi):
            if cache.state[i] != HIT_OK:
                if progress is not None:
                    progress(1)
                continue
            stem = os.path.splitext(os.path.basename(dataset.paths[i]))[0]
            name = stem if stem not in used else f"{stem}_{i}"
            used[name] = i
            path = os.path.join(out_dir, name + ".bin")
            px = cache.rows(i, i + 1)[0]
            if fmt == "uint8-hwc":
                data = px
            else:
                x = px.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
                data = np.ascontiguousarray((x - m) / s, np.float32)
            with open(path, "wb") as f:
                f.write(np.ascontiguousarray(data).tobytes())
            info_lines.append(f"{written} {path} {w} {h}")
            image_lines.append(f"{i}\t{dataset.paths[i]}\t{int(dataset.labels[i])}\t{name}.bin")
            written += 1
            if progress is not None:
                progress(1)
    shape = f"3x{h}x{w} float32" if fmt == "float32-nchw" else f"{h}x{w}x3 uint8"
    with open(os.path.join(out_dir, "prep_bin.info"), "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in info_lines))
    with open(os.path.join(out_dir, "images.tsv"), "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(f"# dataset index, image path relative to {dataset.root}, label, .bin file ({shape})\n")
        f.write("".join(line + "\n" for line in image_lines))
    return written

"""The pixel cache's on-disk format: per-image states, the record layout, the row checksum, the
identity of an image file, and the space check (NOTE [Pixel cache layout and durability] in
engine/pipeline/pixelcache/__init__.py)."""

from __future__ import annotations

import hashlib
import os
import zlib
from typing import Dict, Optional, Tuple

import numpy as np

from engine.errors import RunError
from engine.files import hash_file

FORMAT_VERSION = 1

MISS, HIT_OK, HIT_FAILED = 0, 1, 2

# record status on disk
_EMPTY, _REC_OK, _REC_FAILED = 0, 1, 2
_MAGIC = 0x31435049  # "IPC1" little-endian

RECORD = np.dtype([
    ("magic", "<u4"),
    ("status", "u1"),
    ("has_content", "u1"),
    ("pad0", "<u2"),
    ("mode", "<u4"),
    ("pad1", "<u4"),
    ("label", "<i8"),
    ("size", "<i8"),
    ("mtime_ns", "<i8"),
    ("path_hash", "<u8", (2,)),
    ("checksum", "<u8"),
    ("content", "<u8", (2,)),
    ("reason_off", "<u8"),
    ("reason_len", "<u4"),
    ("reason_crc", "<u4"),
    ("pad2", "<u8", (3,)),
    ("pad3", "<u4"),
    ("crc", "<u4"),
])
assert RECORD.itemsize == 128, RECORD.itemsize
_CRC_BYTES = RECORD.itemsize - 4

# checksum: sums of uint64 words per block of _BLOCK_WORDS (4 KiB), weighted by odd constants
_BLOCK_WORDS = 512


class PixelCacheError(RunError):
    """The pixel cache cannot be used as asked; the message says what to change."""


class CacheFull(PixelCacheError):
    """Not enough free space for the cache, or the disk filled up while writing it."""


# --------------------------------------------------------------------------- space


def required_bytes(n_images: int, shape: Tuple[int, int, int]) -> int:
    """Bytes on disk for `n_images` rows of `shape` (pixels and records)."""
    return int(n_images) * (int(np.prod(shape)) + RECORD.itemsize)


def _free_bytes(path: str) -> Optional[int]:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _space_message(cache_dir: str, need: int, free: Optional[int], n_missing: int, shape) -> str:
    has = _gb(free) if free is not None else "unknown"
    return (f"pixel cache {cache_dir}: needs {_gb(need)} for {n_missing} images ({int(np.prod(shape))} bytes "
            f"each) but the disk has {has} free: free space, give --pixel-cache a folder on a bigger "
            f"disk, or run without --pixel-cache")


def check_space(cache_dir: str, n_missing: int, shape: Tuple[int, int, int]) -> None:
    """Raise CacheFull (one line) when `n_missing` more rows do not fit on the cache's disk."""
    need = required_bytes(n_missing, shape)
    free = _free_bytes(cache_dir)
    if free is not None and need > free:
        raise CacheFull(_space_message(cache_dir, need, free, n_missing, shape))


# --------------------------------------------------------------------------- checksums


_PLANS: Dict[int, Tuple[int, int, int, np.ndarray, np.uint64, np.uint64]] = {}


def _plan(rb: int) -> Tuple[int, int, int, np.ndarray, np.uint64, np.uint64]:
    """How a row of `rb` bytes is summed: whole 64-bit words in `nb` blocks of `bw` words (bw the
    divisor of the word count nearest 512 words, 4 KiB, so that there is no tail of words), block
    k weighted by 2k+1; the last rb % 8 bytes as one more word."""
    plan = _PLANS.get(rb)
    if plan is None:
        m = rb // 8
        divisors = [d for d in range(1, m + 1) if m % d == 0] if m else [1]
        bw = min(divisors, key=lambda d: (abs(d - _BLOCK_WORDS), d))
        nb = m // bw if m else 0
        weights = np.arange(1, 2 * nb + 1, 2, dtype=np.uint64)
        plan = _PLANS[rb] = (m * 8, bw, nb, weights, np.uint64(2 * nb + 1), np.uint64(_SEED))
    return plan


_SEED = 0x9E3779B97F4A7C15


def checksums(rows: np.ndarray) -> np.ndarray:
    """uint64 checksum per row of a uint8 [n, ...] array: the 64-bit words of each row are summed
    in blocks of about 4 KiB (mod 2**64), block k weighted by 2k+1, so a change in any one word
    and blocks swapped or lost change it. About 4x faster than zlib.crc32 here, and it releases
    the GIL; measured in docs/pixel-cache.md."""
    n = rows.shape[0]
    flat = rows.reshape(n, -1)
    rb = flat.shape[1]
    if n == 0:
        return np.zeros(0, np.uint64)
    q, bw, nb, weights, tail_weight, seed = _plan(rb)
    if not flat.flags.c_contiguous or flat.ctypes.data % 8:
        flat = np.ascontiguousarray(flat)
    if nb:
        words = (flat if q == rb else np.ascontiguousarray(flat[:, :q])).view(np.uint64)  # numpy < 1.23
        out = (words.reshape(n, nb, bw).sum(axis=2, dtype=np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    else:
        out = np.zeros(n, np.uint64)
    if q != rb:
        rest = np.zeros((n, 8), np.uint8)
        rest[:, :rb - q] = flat[:, q:]
        out += rest.view(np.uint64)[:, 0] * tail_weight
    out ^= seed
    return out


def _path_hash(rel: str) -> Tuple[int, int]:
    d = hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=16).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")


def content_hash(path, reader=None) -> Tuple[int, int]:
    """blake2b-128 of a file's bytes (or of a container image's, `path` a locator read by
    `reader`, preprocess/containers.py); (0, 0) when it cannot be read."""
    h = hashlib.blake2b(digest_size=16)
    if reader is not None and not isinstance(path, str):
        from preprocess.decode import DecodeError

        try:
            h.update(reader.read(path))
        except (OSError, DecodeError):
            return 0, 0
    else:
        try:
            hash_file(path, h)
        except OSError:
            return 0, 0
    d = h.digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")


def _stat(path: str) -> Tuple[int, int, int]:
    """(size, mtime_ns, mode) of the file the path names; of the link itself for a dangling
    symlink (its failure is then cached like any other, and a target appearing changes the mode);
    (-1, -1, 0) when there is nothing (never a hit)."""
    try:
        st = os.stat(path)
    except OSError:
        try:
            st = os.lstat(path)
        except OSError:
            return -1, -1, 0
    return st.st_size, st.st_mtime_ns, st.st_mode


def _record_crc(rec_bytes: bytes) -> int:
    return zlib.crc32(rec_bytes[:_CRC_BYTES])

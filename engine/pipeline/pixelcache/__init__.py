"""The exact pixel cache: the final uint8 crops of an earlier run, read back instead of decoded.

API (what the sources, make-cache and the benches use):

    CACHE_ENV = "IMAGENET_ENGINE_CACHE"      default root: $IMAGENET_ENGINE_CACHE/pixels, else
                                             ~/.cache/imagenet-engine/pixels
    PIXEL_PATH_VERSION                       bump when the engine's pixel path changes
    default_pixel_cache_dir() -> str
    PixelCacheError(RuntimeError)            the message says what to change
    CacheFull(PixelCacheError)               not enough space, or ENOSPC while writing
    MISS, HIT_OK, HIT_FAILED = 0, 1, 2       per-image state
    PixelCache.open(root, dataset, spec, max_image_pixels, verify=False, write=True) -> PixelCache
        .dir .writable .shape (H, W, 3) .state int8[N] .note (why it opened read-only, or "")
        .reason(i) -> str                    a HIT_FAILED image's reason, exactly as it was reported
        .prefetch(lo, hi)                    madvise(WILLNEED) of rows [lo, hi)
        .rows(lo, hi) -> uint8[hi-lo, H, W, 3]   zero-copy view of the mapped file
        .check(lo, hi) -> bool[hi-lo]        True = a HIT_OK row whose checksum is wrong; such rows
                                             become MISS and count as rejected. Call once per batch
                                             (it counts the hits: rows that pass, and HIT_FAILED rows)
        .read_into(lo, hi, out) -> bool[hi-lo]   copy the HIT_OK rows into out[0:hi-lo] (staging) and
                                             check them on the copy (as check; one pass over memory)
        .put(lo, pixels, status, reasons)    write-through of rows [lo, lo+n) (status: ring OK/FAILED;
                                             reasons {row: str}); only rows that are MISS are stored;
                                             raises CacheFull on a full disk, PixelCacheError on
                                             other write errors (then not writable, the run goes on);
                                             a no-op when not writable. It pwrites (~40 MB a batch)
                                             and flushes itself every 5 s / 4096 rows (fdatasync):
                                             call put and flush from one helper thread, not the loop
        .flush()                             make everything put so far durable and visible to readers
        .refresh() -> int                    a reader re-reads the records (entries flushed since open)
        .stats() -> dict                     dir, hits, written, rejected, writable, bytes, ...
        .close()
    required_bytes(n_images, shape) -> int
    check_space(cache_dir, n_missing, shape)  raises CacheFull: one line, need X GB, have Y GB, what to do
    export_bin(cache, dataset, out_dir, fmt="uint8-hwc" | "float32-nchw", mean=None, std=None,
               progress=None) -> int         ModelZoo layout: one raw .bin per image plus an info file

NOTE [Pixel cache layout and durability]
========================================

    <root>/<H>x<W>-<decode>-<key hash>/      one folder per preprocessing + data folder
        key.json      what the key is: every input that decides the pixels (written once, renamed)
        pixels        N rows of H*W*3 bytes, dataset order, sparse (ftruncate); a batch is a slice
        records       N fixed-size records (RECORD dtype), record i describes row i
        reasons       failure reasons, UTF-8 (surrogatepass), appended; a record points into it
        complete.json completion record: counts at the last flush (tmp + fsync + rename)
        lock          flock'ed by the one writer

A record holds the image's relative-path hash, size, mtime_ns, mode, label, status, the row's
pixel checksum, an optional content hash (verify), where its reason is, and a crc32 of itself: a
torn or garbage record fails its crc and reads as missing. An entry is used only when its record
is whole and every field matches the file as it is now (and, for pixels, the checksum matches
the row when it is read: `check`).

Write order (put, flush): pixels and reasons are written with pwrite (never through the mapping:
a full disk then gives ENOSPC, not SIGBUS); flush fdatasyncs them, only then writes the records
of those rows, fdatasyncs the records, and renames a fresh completion record into place. So a
record on disk only ever points at pixels that reached the disk before it: a crash, SIGKILL or
full disk at any moment leaves rows that are either valid or missing. Readers never take the
lock; they see records (whole, crc-checked) of rows whose pixels were already written.

The package by concern: key.py (what decides the pixels), format.py (states, records, checksums,
the space check), reader.py and writer.py (the two sides of `PixelCache`, cache.py), export.py.
"""

from __future__ import annotations

from engine.pipeline.pixelcache.cache import PixelCache
from engine.pipeline.pixelcache.export import export_bin
from engine.pipeline.pixelcache.format import (FORMAT_VERSION, HIT_FAILED, HIT_OK, MISS, RECORD, CacheFull,
                                               PixelCacheError, check_space, checksums, content_hash,
                                               required_bytes)
from engine.pipeline.pixelcache.key import (CACHE_ENV, PIXEL_PATH_VERSION, decoder_identity, default_pixel_cache_dir,
                                            pixel_key)

__all__ = ["CACHE_ENV", "FORMAT_VERSION", "HIT_FAILED", "HIT_OK", "MISS", "PIXEL_PATH_VERSION", "RECORD", "CacheFull",
           "PixelCache", "PixelCacheError", "check_space", "checksums", "content_hash", "decoder_identity",
           "default_pixel_cache_dir", "export_bin", "pixel_key", "required_bytes"]

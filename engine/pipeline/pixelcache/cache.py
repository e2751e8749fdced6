"""`PixelCache`: one cache folder opened for one data set, read (engine/pipeline/pixelcache/reader.py)
and, by the one run that holds its lock, written (engine/pipeline/pixelcache/writer.py)."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from engine.pipeline.pixelcache.format import MISS, RECORD, CacheFull, PixelCacheError, _path_hash, _stat, check_space
from engine.pipeline.pixelcache.key import _key_hash, _shape_of, default_pixel_cache_dir, pixel_key
from engine.pipeline.pixelcache.reader import CacheReader
from engine.pipeline.pixelcache.writer import CacheWriter


class PixelCache(CacheWriter, CacheReader):
    """One cache folder opened for one dataset. Build with `PixelCache.open`."""

    @classmethod
    def open(cls, root: Optional[str], dataset, spec, max_image_pixels: Optional[int], verify: bool = False,
             write: bool = True) -> "PixelCache":
        """Open (creating if need be) the folder for `spec` and `dataset.root` under `root` and compute
        every image's state. `write`: take the writer lock if free (else open read-only, `note` says
        why). `verify`: compare content hashes too (reads every file once)."""
        self = cls()
        try:
            self._open(root, dataset, spec, max_image_pixels, verify, write)
        except BaseException:
            self.close()
            raise
        return self

    def _open(self, root: Optional[str], dataset, spec, max_image_pixels: Optional[int], verify: bool,
              write: bool) -> None:
        root = root or default_pixel_cache_dir()
        self.shape = _shape_of(spec)
        self._row_bytes = int(np.prod(self.shape))
        self.key = pixel_key(spec, max_image_pixels, dataset.root)
        container = getattr(dataset, "container", None)
        if container is not None:  # tar / Parquet images: keyed by container position (containers/)
            self.key["data"] = dataset.root if "://" in dataset.root else os.path.realpath(dataset.root)
            self.key["container"] = container.layout
        h, w = self.shape[:2]
        self.dir = os.path.join(os.path.abspath(root), f"{h}x{w}-{spec.decode}-{_key_hash(self.key)}")
        self._dataset = dataset
        self._verify = bool(verify)
        self._n = n = len(dataset)
        if write:
            try:
                os.makedirs(self.dir, exist_ok=True)
            except OSError as e:
                raise PixelCacheError(f"pixel cache {self.dir}: cannot create it ({e.strerror or e}); give "
                                      "--pixel-cache a folder you can write, or run without it") from None
            self._take_lock()
        key_ok = self._check_key()
        # the file identities as they are now
        join, base = os.path.join, dataset.root
        if container is not None:
            self._stat, self._phash = container.identity(dataset.paths, self._stat.dtype)
        else:
            self._stat = np.array([_stat(join(base, p)) for p in dataset.paths], dtype=self._stat.dtype)
            self._phash = np.array([_path_hash(p) for p in dataset.paths], np.uint64).reshape(n, 2)
        if verify:
            self._content = self._hash_contents()
        self._open_files()
        size = os.fstat(self._pix_fd).st_size if self._pix_fd >= 0 else 0
        self._present = min(n, size // self._row_bytes)  # rows the pixels file holds now
        self._records = self._read_records(0, n) if key_ok else np.zeros(n, RECORD)
        self.state = np.zeros(n, np.int8)
        self._rejected = 0
        self._classify(np.arange(n), count_rejected=True)
        if self.writable:
            try:
                check_space(self.dir, int((self.state == MISS).sum()), self.shape)
            except CacheFull as e:
                self.note = str(e)
                self._drop_writer()
        if self.writable:
            self._forget_lost_rows()
            self._grow(n)
        self._map()

    def close(self) -> None:
        """Flush (writer), unmap, close the files and release the lock. Safe to call twice."""
        try:
            if self.writable and self._pending:
                self.flush()
        finally:
            self._unmap()
            for attr in ("_pix_fd", "_rec_fd", "_why_fd"):
                fd = getattr(self, attr)
                if fd >= 0:
                    os.close(fd)
                    setattr(self, attr, -1)
            self._drop_writer()

    def __enter__(self) -> "PixelCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""The state a `PixelCache` keeps, shared by its read side (reader.py) and its write side (writer.py)."""

from __future__ import annotations

import mmap
import threading
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np

from engine.pipeline.pixelcache.format import RECORD


class CacheState:
    """One cache folder's files, mapping, records and counters (set by `PixelCache.open`)."""

    def __init__(self) -> None:  # use open()
        self.dir = ""
        self.writable = False
        self.note = ""
        self.shape: Tuple[int, int, int] = (0, 0, 3)
        self.state = np.zeros(0, np.int8)
        self.key: Dict[str, object] = {}
        self._n = 0
        self._row_bytes = 0
        self._dataset: Any = None  # the run's Dataset, set by open()
        self._verify = False
        self._pix_fd = -1
        self._rec_fd = -1
        self._why_fd = -1
        self._lock_fd = -1
        self._mm: Optional[mmap.mmap] = None
        self._all: Optional[np.ndarray] = None
        self._mapped_rows = 0
        self._present = 0
        self._records = np.zeros(0, RECORD)
        self._stat = np.zeros(0, dtype=[("size", "<i8"), ("mtime_ns", "<i8"), ("mode", "<u4")])
        self._phash = np.zeros((0, 2), np.uint64)
        self._content = np.zeros((0, 2), np.uint64)
        self._pending: Dict[int, bytes] = {}
        self._reason_cache: Dict[int, str] = {}
        self._written = 0
        self._written_failed = 0
        self._rejected = 0
        self._hits = 0
        self._last_flush = time.monotonic()
        self._count_lock = threading.Lock()  # check() may run on several threads at once

    def _count(self, hits: int = 0, rejected: int = 0) -> None:
        with self._count_lock:
            self._hits += hits
            self._rejected += rejected


"""Reading a pixel cache: which images it holds (their records against the files as they are now),
zero-copy rows of the mapped pixels file, the checksum check of each batch, and a reader's refresh
of what a writer has flushed since (NOTE [Pixel cache layout and durability] in
engine/pipeline/pixelcache/__init__.py). `CacheReader` holds no state of its own: the state is
`PixelCache`'s (engine/pipeline/pixelcache/cache.py), which combines it with `CacheWriter`."""

from __future__ import annotations

import mmap
import os
import zlib
from typing import Dict, List, Optional, Tuple

import numpy as np

from engine.pipeline.pixelcache.state import CacheState
from engine.pipeline.pixelcache.format import (_CRC_BYTES, _MAGIC, _REC_FAILED, _REC_OK, HIT_FAILED, HIT_OK, MISS,
                                               RECORD, PixelCacheError, checksums, content_hash)


class CacheReader(CacheState):
    """The read side of `PixelCache`."""

    def _hash_contents(self) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        ds = self._dataset
        if getattr(ds, "container", None) is not None:  # one reader: it keeps the containers open
            from preprocess.containers import ByteReader

            reader = ByteReader()
            hashes = [content_hash(ds.locator(i), reader) for i in range(self._n)]
            reader.close()
            return np.array(hashes, np.uint64).reshape(self._n, 2)
        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as ex:
            hashes = list(ex.map(content_hash, (ds.abspath(i) for i in range(self._n))))
        return np.array(hashes, np.uint64).reshape(self._n, 2)

    def _open_files(self) -> None:
        flags = os.O_RDWR | os.O_CREAT if self.writable else os.O_RDONLY
        for attr, name in (("_pix_fd", "pixels"), ("_rec_fd", "records"), ("_why_fd", "reasons")):
            path = os.path.join(self.dir, name)
            try:
                fd = os.open(path, flags, 0o644) if self.writable else os.open(path, flags)
            except FileNotFoundError:
                fd = -1
            except OSError as e:
                raise PixelCacheError(f"pixel cache {self.dir}: cannot open {name} ({e.strerror or e}); "
                                      "fix its permissions or give --pixel-cache another folder") from None
            setattr(self, attr, fd)

    def _map(self) -> None:
        if self._pix_fd < 0 or self._n == 0:
            return
        size = os.fstat(self._pix_fd).st_size
        rows = min(self._n, size // self._row_bytes)
        if rows <= 0:
            return
        self._mm = mmap.mmap(self._pix_fd, rows * self._row_bytes, mmap.MAP_SHARED, mmap.PROT_READ)
        self._all = np.frombuffer(self._mm, np.uint8).reshape((rows,) + self.shape)
        self._mapped_rows = rows

    def _read_records(self, lo: int, hi: int) -> np.ndarray:
        out = np.zeros(hi - lo, RECORD)
        if self._rec_fd < 0 or hi <= lo:
            return out
        data = os.pread(self._rec_fd, (hi - lo) * RECORD.itemsize, lo * RECORD.itemsize)
        got = len(data) // RECORD.itemsize
        if got:
            out[:got] = np.frombuffer(data[:got * RECORD.itemsize], RECORD)
        return out

    def _classify(self, idx: np.ndarray, count_rejected: bool) -> None:
        """Set state[idx] from the records and the files as they are now."""
        if len(idx) == 0:
            return
        rec = self._records[idx]
        raw = rec.tobytes()
        size = RECORD.itemsize
        crc_ok = np.fromiter((zlib.crc32(raw[k * size:k * size + _CRC_BYTES]) for k in range(len(idx))),
                             np.uint32, count=len(idx)) == rec["crc"]
        present = rec["magic"] == _MAGIC
        nonzero = np.frombuffer(raw, np.uint8).reshape(len(idx), size).any(axis=1)
        whole = crc_ok & present & np.isin(rec["status"], (_REC_OK, _REC_FAILED))
        st = self._stat[idx]
        same = (whole
                & (rec["path_hash"] == self._phash[idx]).all(axis=1)
                & (rec["size"] == st["size"]) & (rec["mtime_ns"] == st["mtime_ns"]) & (rec["mode"] == st["mode"])
                & (rec["label"] == np.asarray(self._dataset.labels, np.int64)[idx])
                & (st["size"] >= 0))
        if self._verify:
            same &= (rec["has_content"] == 1) & (rec["content"] == self._content[idx]).all(axis=1)
        ok = same & (rec["status"] == _REC_OK) & (idx < self._present)
        failed = same & (rec["status"] == _REC_FAILED)
        for k in np.nonzero(failed)[0]:
            if self._load_reason(int(idx[k]), rec[k]) is None:
                failed[k] = False
        state = np.full(len(idx), MISS, np.int8)
        state[ok] = HIT_OK
        state[failed] = HIT_FAILED
        self.state[idx] = state
        if count_rejected:
            self._count(rejected=int((nonzero & (state == MISS)).sum()))

    def _load_reason(self, i: int, rec) -> Optional[str]:
        if self._why_fd < 0:
            return None
        length = int(rec["reason_len"])
        data = os.pread(self._why_fd, length, int(rec["reason_off"]))
        if len(data) != length or zlib.crc32(data) != int(rec["reason_crc"]):
            return None
        try:
            text = data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return None
        self._reason_cache[i] = text
        return text

    def reason(self, i: int) -> str:
        """The stored failure reason of a HIT_FAILED image, exactly as the decoder reported it."""
        if self.state[i] != HIT_FAILED or i not in self._reason_cache:
            raise PixelCacheError(f"pixel cache: image {i} has no stored failure (state {int(self.state[i])})")
        return self._reason_cache[i]

    def prefetch(self, lo: int, hi: int) -> None:
        """Ask the kernel to read rows [lo, hi) ahead (madvise WILLNEED)."""
        hi = min(hi, self._mapped_rows)
        if self._mm is None or hi <= lo:
            return
        page = mmap.PAGESIZE
        start = lo * self._row_bytes // page * page
        end = hi * self._row_bytes
        try:
            self._mm.madvise(mmap.MADV_WILLNEED, start, end - start)
        except (AttributeError, OSError, ValueError):
            try:
                os.posix_fadvise(self._pix_fd, start, end - start, os.POSIX_FADV_WILLNEED)
            except (AttributeError, OSError):
                pass

    def mapping(self) -> Optional[Tuple[str, int, int]]:
        """(pixels file, address of its mapping in this process, mapped bytes), or None when nothing
        is mapped: a device process (engine/pipeline/devices.py) maps the same file and reads a
        batch from `rows()` at the same offset, so cached pixels never travel through a pipe."""
        if self._all is None:
            return None
        return (os.path.join(self.dir, "pixels"), int(self._all.__array_interface__["data"][0]),
                int(self._mapped_rows * self._row_bytes))

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Zero-copy uint8 [hi-lo, H, W, 3] view of rows [lo, hi) of the mapped pixels file. Only
        HIT_OK rows (after `check`) hold valid pixels; valid until `close()`."""
        if self._all is None or hi > self._mapped_rows:
            raise PixelCacheError(f"pixel cache {self.dir}: rows [{lo}, {hi}) are not mapped "
                                  f"({self._mapped_rows} rows are)")
        return self._all[lo:hi]

    def check(self, lo: int, hi: int) -> np.ndarray:
        """Verify the checksums of the HIT_OK rows in [lo, hi). Returns bool [hi-lo], True where a row
        is bad; those rows become MISS (decode them) and count as rejected. Call it once per batch:
        it counts the batch's hits (HIT_OK rows that pass, and HIT_FAILED rows, whose reason is
        read with `reason`)."""
        bad = np.zeros(hi - lo, bool)
        self._count(hits=int((self.state[lo:hi] == HIT_FAILED).sum()))
        self._still_there(lo, hi, bad)
        sel = np.nonzero(self.state[lo:hi] == HIT_OK)[0]
        if len(sel) == 0 or self._all is None:
            return bad
        if len(sel) == hi - lo:
            sums = checksums(self._all[lo:hi])
        else:
            sums = checksums(self._all[lo + sel])
        wrong = sums != self._records["checksum"][lo + sel]
        bad[sel[wrong]] = True
        if wrong.any():
            self.state[lo + sel[wrong]] = MISS
        self._count(hits=len(sel) - int(wrong.sum()), rejected=int(wrong.sum()))
        return bad

    def _still_there(self, lo: int, hi: int, bad: np.ndarray) -> None:
        """Rows the pixels file lost since open (cut short behind our back) become bad misses
        instead of a SIGBUS when touched: one fstat per batch."""
        if self._pix_fd < 0 or self._all is None:
            return
        try:
            rows = os.fstat(self._pix_fd).st_size // self._row_bytes
        except OSError:
            return
        if rows >= hi:
            return
        gone = np.nonzero(self.state[max(lo, rows):hi] == HIT_OK)[0] + max(lo, rows)
        if len(gone):
            self.state[gone] = MISS
            bad[gone - lo] = True
            self._count(rejected=len(gone))

    def read_into(self, lo: int, hi: int, out: np.ndarray, chunk: int = 4) -> np.ndarray:
        """Copy the HIT_OK rows of [lo, hi) into `out` (uint8 [>= hi-lo, H, W, 3], e.g. pinned
        staging memory) and verify the checksums on the copy, a few rows at a time while they are
        still in the CPU cache: one pass over the mapped bytes instead of two, and what is checked
        is exactly what the caller sends on. Returns bool [hi-lo], True = bad (as `check`); rows
        that are not HIT_OK are left alone (decode them into `out`)."""
        bad = np.zeros(hi - lo, bool)
        self._still_there(lo, hi, bad)
        state = self.state[lo:hi]
        self._count(hits=int((state == HIT_FAILED).sum()))
        sel = np.nonzero(state == HIT_OK)[0]
        if len(sel) == 0 or self._all is None:
            return bad
        src, want = self._all, self._records["checksum"]
        runs = np.split(sel, np.nonzero(np.diff(sel) != 1)[0] + 1)
        wrong_rows: List[int] = []
        for run in runs:
            a0, b0 = int(run[0]), int(run[-1]) + 1
            for a in range(a0, b0, chunk):
                b = min(b0, a + chunk)
                dst = out[a:b]
                np.copyto(dst, src[lo + a:lo + b])
                sums = checksums(dst)
                wrong = np.nonzero(sums != want[lo + a:lo + b])[0]
                if len(wrong):
                    wrong_rows.extend(int(a + k) for k in wrong)
        if wrong_rows:
            w = np.array(wrong_rows)
            bad[w] = True
            self.state[lo + w] = MISS
        self._count(hits=len(sel) - len(wrong_rows), rejected=len(wrong_rows))
        return bad

    def refresh(self) -> int:
        """Re-read the records of the rows that are MISS (a reader picking up what the writer has
        flushed since). Returns how many became hits."""
        miss = np.nonzero(self.state == MISS)[0]
        if len(miss) == 0 or self._rec_fd < 0:
            return 0
        if self._pix_fd >= 0 and not self.writable:
            size = os.fstat(self._pix_fd).st_size
            if min(self._n, size // self._row_bytes) > self._mapped_rows:
                self._unmap()
                self._map()
            self._present = self._mapped_rows
        self._records[miss] = self._read_records(0, self._n)[miss]
        self._classify(miss, count_rejected=False)
        return int((self.state[miss] != MISS).sum())

    def stats(self) -> Dict[str, object]:
        """Counts for the report: hits (rows checked good and read), written (stored this run),
        rejected (entries found but not used), and the folder and its size."""
        try:
            disk = os.fstat(self._pix_fd).st_blocks * 512 if self._pix_fd >= 0 else 0
        except OSError:
            disk = 0
        return {
            "dir": self.dir,
            "hits": int(self._hits),
            "hits_failed": int((self.state == HIT_FAILED).sum()),
            "written": int(self._written),
            "written_failed": int(self._written_failed),
            "rejected": int(self._rejected),
            "writable": bool(self.writable),
            "bytes": int(disk),
            "images": int(self._n),
            "valid": int((self.state != MISS).sum()),
            "verify": bool(self._verify),
            "note": self.note,
        }

    def _unmap(self) -> None:
        self._all = None
        mm, self._mm = self._mm, None
        self._mapped_rows = 0
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # a batch view is still alive; the mapping goes with it

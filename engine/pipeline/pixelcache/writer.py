"""Writing a pixel cache: the one writer's lock, write-through of decoded rows, and the durable
order of a flush (NOTE [Pixel cache layout and durability] in engine/pipeline/pixelcache/__init__.py):
pixels and reasons first, their records only after them, then the completion record. A full disk
or an I/O error stops writing and leaves the cache resumable. `CacheWriter` holds no state of its
own: the state is `PixelCache`'s (engine/pipeline/pixelcache/cache.py)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
import zlib
from typing import Dict, List, Optional

import numpy as np

from engine.files import is_disk_full, pwrite_all, write_replace
from engine.pipeline.pixelcache.state import CacheState
from engine.pipeline.pixelcache.format import (_CRC_BYTES, _EMPTY, _MAGIC, _REC_FAILED, _REC_OK, FORMAT_VERSION,
                                               HIT_FAILED, HIT_OK, MISS, RECORD, CacheFull, PixelCacheError,
                                               checksums)


def _write_json_atomic(path: str, obj) -> None:
    """key.json and complete.json: tmp, fsync, rename, the folder fsynced where it can be."""
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")
    write_replace(path, data, tmp=f"{path}.tmp.{os.getpid()}", strict_dir_sync=False)


class CacheWriter(CacheState):
    """The write side of `PixelCache`."""

    def _take_lock(self) -> None:
        path = os.path.join(self.dir, "lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            self.note = f"pixel cache {self.dir}: read-only (cannot open its lock file: {e.strerror or e})"
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                self.note = (f"pixel cache {self.dir}: another run is writing it; this run reads what is "
                             "there and decodes the rest without storing it")
                return
            self.note = f"pixel cache {self.dir}: read-only (cannot lock it: {e.strerror or e})"
            return
        self._lock_fd = fd
        self.writable = True

    def _drop_writer(self) -> None:
        self.writable = False
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def _check_key(self) -> bool:
        """True when key.json says this key; writes it in a new folder (or over a bad one, as writer)."""
        path = os.path.join(self.dir, "key.json")
        try:
            with open(path, encoding="utf-8") as f:
                found = json.load(f)
        except (OSError, ValueError):
            found = None
        if found == self.key:
            return True
        if found is not None and not self.writable:
            return False
        if self.writable:
            # a new folder, or one whose key file is lost or garbage: start it again
            for name in ("records", "reasons", "complete.json"):
                try:
                    os.unlink(os.path.join(self.dir, name))
                except FileNotFoundError:
                    pass
            _write_json_atomic(path, self.key)
            return False
        return False

    def _forget_lost_rows(self) -> None:
        """Writer, before it grows a truncated pixels file back: clear the records of the rows the
        file lost, so no record ever points at the zeros of the regrown part."""
        lost = np.nonzero(self._records["status"][self._present:] != _EMPTY)[0] + self._present
        if len(lost) == 0:
            return
        zero = bytes(RECORD.itemsize)
        for i in lost:
            pwrite_all(self._rec_fd, zero, int(i) * RECORD.itemsize)
        os.fdatasync(self._rec_fd)
        self._records[lost] = np.zeros(len(lost), RECORD)

    def _grow(self, n: int) -> None:
        """Writer: the pixels file covers n rows (sparse), the records file n records (allocated)."""
        want_pix = n * self._row_bytes
        if os.fstat(self._pix_fd).st_size < want_pix:
            os.ftruncate(self._pix_fd, want_pix)
        want_rec = n * RECORD.itemsize
        if os.fstat(self._rec_fd).st_size < want_rec:
            os.ftruncate(self._rec_fd, want_rec)
            try:
                os.posix_fallocate(self._rec_fd, 0, want_rec)
            except (OSError, AttributeError):
                pass

    def put(self, lo: int, pixels: np.ndarray, status: np.ndarray, reasons: Optional[Dict[int, str]] = None) -> None:
        """Store dataset rows [lo, lo+n), n = len(status): the pixels of rows whose status is the
        ring's OK, the reason of rows whose status is FAILED (reasons {row: str}). Pixels are
        written now; their records at the next flush (automatic every few seconds). Raises
        CacheFull when the disk is full; the cache is then read-only and stays resumable."""
        if not self.writable:
            return
        from engine.pipeline.ring import FAILED, OK

        status = np.asarray(status)
        n = len(status)
        if lo < 0 or lo + n > self._n:
            raise PixelCacheError(f"pixel cache: put of rows [{lo}, {lo + n}) outside the dataset (0..{self._n})")
        reasons = reasons or {}
        todo = self.state[lo:lo + n] == MISS
        ok = np.nonzero(todo & (status == OK))[0]
        failed = np.nonzero(todo & (status == FAILED))[0]
        try:
            if len(ok):
                sums = checksums(pixels[ok] if len(ok) < n else pixels[:n])
                # contiguous runs of OK rows in one pwrite each
                runs = np.split(ok, np.nonzero(np.diff(ok) != 1)[0] + 1)
                for run in runs:
                    a, b = int(run[0]), int(run[-1]) + 1
                    block = np.ascontiguousarray(pixels[a:b])
                    pwrite_all(self._pix_fd, block, (lo + a) * self._row_bytes)
                for k, row in enumerate(ok):
                    self._pending[lo + int(row)] = self._record(lo + int(row), _REC_OK, int(sums[k]))
            for row in failed:
                text = reasons.get(int(row), "")
                data = text.encode("utf-8", "surrogatepass")
                off = os.lseek(self._why_fd, 0, os.SEEK_END)
                pwrite_all(self._why_fd, data, off)
                self._pending[lo + int(row)] = self._record(lo + int(row), _REC_FAILED, 0, off, data)
                self._reason_cache[lo + int(row)] = text
        except OSError as e:
            self._write_failed(e, sync_pending=True)
        self._written += len(ok)
        self._written_failed += len(failed)
        if len(self._pending) >= 4096 or time.monotonic() - self._last_flush > 5.0:
            self.flush()

    def _record(self, i: int, status: int, checksum: int, reason_off: int = 0, reason: bytes = b"") -> bytes:
        r = np.zeros(1, RECORD)
        r["magic"] = _MAGIC
        r["status"] = status
        r["label"] = int(self._dataset.labels[i])
        st = self._stat[i]
        r["size"], r["mtime_ns"], r["mode"] = st["size"], st["mtime_ns"], st["mode"]
        r["path_hash"] = self._phash[i]
        r["checksum"] = checksum
        if self._verify:
            r["has_content"] = 1
            r["content"] = self._content[i]
        r["reason_off"] = reason_off
        r["reason_len"] = len(reason)
        r["reason_crc"] = zlib.crc32(reason)
        raw = bytearray(r.tobytes())
        raw[_CRC_BYTES:] = zlib.crc32(bytes(raw[:_CRC_BYTES])).to_bytes(4, "little")
        return bytes(raw)

    def _write_failed(self, e: OSError, sync_pending: bool) -> None:
        """A write failed (ENOSPC, EIO, ...): keep what is durable, stop writing, stay resumable, and
        raise CacheFull (disk full) or PixelCacheError (any other error). `sync_pending`: the rows
        put before are whole in the page cache, so their records may follow one more fdatasync;
        False after a failed fdatasync, whose rows are dropped (a second fdatasync can report
        success for data the first one lost)."""
        pending, self._pending = self._pending, {}
        if sync_pending:
            try:
                os.fdatasync(self._pix_fd)
                os.fdatasync(self._why_fd)
                self._write_records(pending)
            except OSError:
                pass  # those rows stay missing: their records never reach the disk
        self._drop_writer()
        if is_disk_full(e):
            raise CacheFull(f"pixel cache {self.dir}: the disk is full ({e.strerror or e}); stopped writing the "
                            "cache, the run goes on decoding; free space and run again to complete it") from None
        raise PixelCacheError(f"pixel cache {self.dir}: cannot write it ({e.strerror or e}); stopped writing "
                              "the cache, the run goes on decoding; check the disk, or run without "
                              "--pixel-cache") from None

    def _write_records(self, pending: Dict[int, bytes]) -> None:
        if not pending:
            return
        idx = sorted(pending)
        runs: List[List[int]] = [[idx[0]]]
        for i in idx[1:]:
            if i == runs[-1][-1] + 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            pwrite_all(self._rec_fd, b"".join(pending[i] for i in run), run[0] * RECORD.itemsize)
        os.fdatasync(self._rec_fd)
        for i in idx:
            self._records[i] = np.frombuffer(pending[i], RECORD)[0]
        ok = [i for i in idx if self._records["status"][i] == _REC_OK]
        failed = [i for i in idx if self._records["status"][i] == _REC_FAILED]
        self.state[ok] = HIT_OK
        self.state[failed] = HIT_FAILED

    def flush(self) -> None:
        """Pixels and reasons to disk (fdatasync), then their records (fdatasync), then the
        completion record (tmp + fsync + rename). After it, readers that open see these rows."""
        self._last_flush = time.monotonic()
        if not self.writable:
            return
        pending, self._pending = self._pending, {}
        try:
            os.fdatasync(self._pix_fd)
            os.fdatasync(self._why_fd)
        except OSError as e:
            self._write_failed(e, sync_pending=False)
        try:
            self._write_records(pending)
            _write_json_atomic(os.path.join(self.dir, "complete.json"), self._completion())
        except OSError as e:
            self._write_failed(e, sync_pending=False)

    def _completion(self) -> Dict[str, object]:
        return {
            "format": FORMAT_VERSION,
            "rows": int(self._mapped_rows),
            "dataset_images": int(self._n),
            "ok": int((self.state == HIT_OK).sum()),
            "failed": int((self.state == HIT_FAILED).sum()),
            "missing": int((self.state == MISS).sum()),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

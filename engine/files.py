"""File helpers shared by the pixel cache and run-score's output folder, without heavy imports
(run-score uses them before any backend loads torch): hashing a file in blocks, writing every byte,
and replacing a file durably (tmp, fsync, rename, the folder fsynced). Each caller keeps its own
algorithm (sha256 for weights and models, blake2b for the pixel cache's keys) and its own errors
(the pixel cache's CacheFull, run-score's DiskFullError)."""

from __future__ import annotations

import errno
import hashlib
import os
from typing import Callable, Optional

BLOCK = 1 << 20  # bytes read at a time when hashing

# what a full disk (or quota) looks like in an OSError
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def hash_file(path: str, h):
    """Feed `path`'s bytes to the hashlib object `h` in 1 MiB blocks; returns `h`. OSError propagates."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    return hash_file(path, hashlib.sha256()).hexdigest()


def is_disk_full(e: OSError) -> bool:
    return e.errno in DISK_FULL


def write_all(fd: int, data) -> None:
    """os.write until every byte of `data` is written."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def pwrite_all(fd: int, data, offset: int) -> None:
    """os.pwrite until every byte of `data` is written at `offset`."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:  # pragma: no cover - pwrite returns >0 or raises
            raise OSError(errno.EIO, "short write")
        done += n


def fsync_dir(path: str, strict: bool = True) -> None:
    """fsync a folder (so a rename in it is durable). `strict=False`: where the file system cannot
    (or the folder is gone), go on."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    """Remove a tmp file left by a failed write; one that is already gone is fine."""
    try:
        os.unlink(path)
    except OSError:
        pass


def write_tmp(tmp: str, data, write: Optional[Callable[[int, object], None]] = None) -> None:
    """Write `data` to the new file `tmp` and fsync it; on any error the file is removed."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            (write or write_all)(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _remove_quietly(tmp)
        raise


def write_replace(path: str, data, tmp: str, write: Optional[Callable[[int, object], None]] = None,
                  strict_dir_sync: bool = True) -> None:
    """Replace `path` durably: `data` into `tmp` (fsynced), renamed over `path`, the folder fsynced.
    A reader sees the old content or the new, never a mix; errors propagate, the tmp file removed."""
    write_tmp(tmp, data, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".", strict=strict_dir_sync)

"""The shared-memory ring of batch slots.

NOTE [Slot ownership and shutdown]
==================================

One shared-memory block holds K slots. Slot k is a batch: `uint8[B, H, W, 3]` pixels, and per
image an int64 label, an int64 dataset index, an int8 status, the decode start time and the
decode time in ns. Only small
integers and file paths travel through the worker pipes; pixels are never pickled.

Every slot is owned by exactly one party at a time, and only the parent moves it on:

        parent: Pool.fill()            workers: chunk jobs             parent: scheduler
    FREE ------------------> FILLING ------------------> READY ------------------> COPYING
      ^   writes labels and           each worker writes its           backend.submit(): H2D
      |   indices, sends chunk        images' pixels, status and       copy of pixels[:n]
      |   jobs (slot, offset, paths)  decode time, then replies        |
      +----------------------------------------------------------------+
                 the copy has finished (not the model): the slot is FREE again

- A worker writes only the rows of the chunk it was sent, and only while the slot is FILLING.
  It sets status BUSY before decoding an image and OK/FAILED after, so when a worker dies the
  parent knows which image it was decoding (see `engine/pipeline/pool.py`, `WorkerPool._on_death`).
- The parent never reads a slot's pixels before all its chunks are answered, and never hands a
  slot back to the workers before the backend reports the copy done (`engine/pipeline/scheduler.py`).
- Shutdown (normal end, error, Ctrl-C, SIGTERM): the parent closes the worker pipes (workers see
  EOF and exit), waits briefly, kills what is left, then closes and unlinks the block. Workers
  never unlink. If the parent is killed outright, workers see EOF on their pipe (and get SIGKILL
  through PR_SET_PDEATHSIG on Linux); the block is unlinked by Python's resource tracker, and
  failing that, by `cleanup_stale()` at the next start: names carry the owner's pid.
- Device decode (`--decode device`, engine/pipeline/encoded.py): the block also holds a byte
  arena per slot, with per image an int64 offset and length into it and an int8 route
  (preprocess/jpeghead.py ROUTE_*), and a small control area the parent writes and workers read
  (the host's decode share, the frame kinds the device decoder takes, its pixel limit). A worker
  writes a JPEG's bytes only inside its chunk's part of the arena (rows lo..hi own bytes
  lo * per_image .. (hi + 1) * per_image), so no two workers write the same bytes; what does not fit
  there is decoded to pixels by the worker instead. Ownership of the arena is the slot's.
- Layout: the offsets, status codes and views are in preprocess/ringlayout.py, which the
  processes that attach (decode workers, device processes) import without importing `engine`.
- Space: `check_space` refuses a ring bigger than the free space of /dev/shm, and the block's
  pages are allocated at creation (`_reserve`), so a mount that fills up later cannot SIGBUS the
  run half-way.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import secrets
from typing import Optional, Tuple

from engine.errors import RunError
from engine.procs import pid_alive
from preprocess.ringlayout import (ALIGN, BUSY, CONTROL_WORDS, CTRL_HOST_SHARE, CTRL_KINDS, CTRL_MAX_PIXELS,  # noqa: F401
                                   EMPTY, FAILED, NAME_PREFIX, OK, SHM_DIR, Layout, RingView, arena_from_size,
                                   attach_block)


class RingError(RunError):
    """The ring cannot be created; the message gives the figures and what to change."""


def cleanup_stale(shm_dir: str = SHM_DIR) -> int:
    """Unlink ring blocks whose owning process is gone (a parent killed outright). Returns a count."""
    removed = 0
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return 0
    for name in names:
        m = re.match(re.escape(NAME_PREFIX) + r"(\d+)-", name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            os.unlink(os.path.join(shm_dir, name))
            removed += 1
        except OSError:
            pass
    return removed


def check_space(nbytes: int, slots: int, batch: int, shm_dir: str = SHM_DIR) -> None:
    """Refuse to start when the ring does not fit in the shared-memory mount."""
    free = shm_free(shm_dir)
    if free is None:
        return  # no /dev/shm (not Linux): nothing to check against
    if nbytes > free:
        raise RingError(_space_message(nbytes, slots, batch, free, shm_dir))


def _reserve(name: str, nbytes: int, slots: int, batch: int, shm_dir: str = SHM_DIR) -> None:
    """Allocate the block's pages now. A tmpfs file is sparse: without this, a /dev/shm that fills
    up later (other programs, other runs) would kill whoever first touches a missing page with
    SIGBUS, in the middle of the run. With it, the run either has all its memory or does not start."""
    fallocate = getattr(os, "posix_fallocate", None)
    path = os.path.join(shm_dir, name)
    if fallocate is None or not os.path.exists(path):
        return  # not Linux: nothing to reserve through
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.ENOMEM):
            free = shm_free(shm_dir)
            raise RingError(_space_message(nbytes, slots, batch, free, shm_dir)) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def shm_free(shm_dir: str = SHM_DIR) -> Optional[int]:
    """Free bytes in the shared-memory mount; None where there is none (not Linux)."""
    try:
        st = os.statvfs(shm_dir)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _space_message(nbytes: int, slots: int, batch: int, free: Optional[int], shm_dir: str) -> str:
    mib = 1 << 20
    has = f"{free / mib:.0f} MiB free" if free is not None else "not enough free"
    return (f"the ring needs {nbytes / mib:.0f} MiB of shared memory ({slots} slots x batch {batch} x "
            f"{nbytes // max(1, slots * batch) // 1024} KiB per image) but {shm_dir} has {has}: lower --batch-size "
            f"or --ring-slots, or enlarge the mount (docker run --shm-size=..., or "
            f"mount -o remount,size=... {shm_dir})")


class Ring(RingView):
    """K batch slots in one shared-memory block. Create in the parent; `attach` (RingView's) in
    the processes that use it."""

    def __init__(self, slots: int, batch: int, shape: Tuple[int, int, int], name: Optional[str] = None,
                 create: bool = True, arena: int = 0):
        if not create:  # kept for callers of the old signature: attaching is RingView.attach
            view = RingView.attach(name or "", slots, batch, shape, arena)
            self.__dict__.update(view.__dict__)
            self._owner, self._shm = False, None
            return
        lay = Layout(slots, batch, shape, arena)
        self._owner = True
        self._shm = None
        cleanup_stale()
        check_space(lay.size, slots, batch)
        from multiprocessing import shared_memory

        name = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self._shm = shared_memory.SharedMemory(name=name, create=True, size=lay.size)
        self.name = self._shm.name.lstrip("/")
        try:
            _reserve(self.name, lay.size, slots, batch)
        except RingError:
            self._shm.close()
            self._shm.unlink()
            raise
        super().__init__(self._shm.buf, slots, batch, shape, arena)

    @classmethod
    def attach(cls, name: str, slots: int, batch: int, shape: Tuple[int, int, int], arena: int = 0) -> "Ring":
        """`arena=-1`: a device-decode ring, its arena size read from the block's size."""
        return cls(slots, batch, shape, name=name, create=False, arena=arena)

    def close(self) -> None:
        """Drop the views; the owner also unlinks the block. Safe to call twice."""
        buf = self._drop_views()
        if self._shm is not None:
            shm, self._shm = self._shm, None
            try:
                shm.close()
            except BufferError:
                pass  # a view is still alive somewhere; unlinking below still frees the memory
            if self._owner:
                try:
                    shm.unlink()
                except FileNotFoundError:
                    pass
        elif isinstance(buf, mmap.mmap):
            try:
                buf.close()
            except BufferError:
                pass

    def __enter__(self) -> "Ring":
        return self

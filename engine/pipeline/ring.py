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

import numpy as np

from engine.procs import pid_alive

SHM_DIR = "/dev/shm"
NAME_PREFIX = "iengine-"
ALIGN = 4096

# per-image status, written by the workers (see the NOTE above)
EMPTY, BUSY, OK, FAILED = 0, 1, 2, 3


class RingError(RuntimeError):
    """The ring cannot be created; the message gives the figures and what to change."""


def _round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


class Layout:
    """Byte offsets of every array in the block; the same arithmetic in parent and workers."""

    def __init__(self, slots: int, batch: int, shape: Tuple[int, int, int], arena: int = 0):
        self.slots, self.batch, self.shape = slots, batch, tuple(shape)
        self.image_bytes = int(np.prod(shape))
        self.slot_bytes = _round_up(batch * self.image_bytes)
        meta = slots * batch
        self.labels_at = 0
        self.indices_at = self.labels_at + 8 * meta
        self.decode_ns_at = self.indices_at + 8 * meta
        self.started_at = self.decode_ns_at + 8 * meta
        self.status_at = self.started_at + 8 * meta
        self.pixels_at = _round_up(self.status_at + meta)
        self.size = self.pixels_at + slots * self.slot_bytes
        # device decode: per-image offsets, lengths, routes; a control area; the byte arenas
        # a whole number of pages per image, so the block's size gives the arena back exactly
        self.arena_per_image = max(1, arena // batch // ALIGN) * ALIGN if arena else 0
        self.arena_bytes = self.arena_per_image * batch  # per slot
        if self.arena_bytes:
            self.offsets_at = self.size
            self.lengths_at = self.offsets_at + 8 * meta
            self.route_at = self.lengths_at + 8 * meta
            self.control_at = _round_up(self.route_at + meta, 64)
            self.arena_at = _round_up(self.control_at + 8 * CONTROL_WORDS)
            self.size = self.arena_at + slots * self.arena_bytes


def arena_from_size(size: int, slots: int, batch: int, shape: Tuple[int, int, int]) -> int:
    """The arena bytes per slot of a block of `size` bytes (how a worker learns it when attaching)."""
    plain = Layout(slots, batch, shape, ALIGN * batch).arena_at
    return (size - plain) // slots


# the control area of a device-decode ring: float64 words written by the parent, read by workers
CONTROL_WORDS = 8
CTRL_HOST_SHARE, CTRL_KINDS, CTRL_MAX_PIXELS = 0, 1, 2


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


class Ring:
    """K batch slots in one shared-memory block. Create in the parent; `attach` in workers."""

    def __init__(self, slots: int, batch: int, shape: Tuple[int, int, int], name: Optional[str] = None,
                 create: bool = True, arena: int = 0):
        if arena < 0:  # attaching to a device-decode ring: the arena's size follows from the block's
            arena = arena_from_size(os.stat(os.path.join(SHM_DIR, name or "")).st_size, slots, batch, shape)
        self.layout = lay = Layout(slots, batch, shape, arena)
        self.slots, self.batch, self.shape = slots, batch, tuple(shape)
        self._owner = create
        self._shm = None
        self._buf = None
        if create:
            cleanup_stale()
            check_space(lay.size, slots, batch)
            from multiprocessing import shared_memory

            name = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            self._shm = shared_memory.SharedMemory(name=name, create=True, size=lay.size)
            self.name = self._shm.name.lstrip("/")
            try:
                _reserve(self.name, lay.size, slots, batch)
            except RingError:
                self.close()
                raise
            self._buf = self._shm.buf
        else:
            assert name is not None, "attach needs the ring's name"
            self.name = name
            self._buf = _attach(name, lay.size)
        buf = self._buf
        meta = (slots, batch)
        self.labels = np.ndarray(meta, np.int64, buf, lay.labels_at)
        self.indices = np.ndarray(meta, np.int64, buf, lay.indices_at)
        self.decode_ns = np.ndarray(meta, np.int64, buf, lay.decode_ns_at)
        self.started = np.ndarray(meta, np.float64, buf, lay.started_at)  # worker's time.monotonic()
        self.status = np.ndarray(meta, np.int8, buf, lay.status_at)
        self._pixels = [
            np.ndarray((batch,) + self.shape, np.uint8, buf, lay.pixels_at + k * lay.slot_bytes)
            for k in range(slots)
        ]
        self.offsets = self.lengths = self.route = self.control = None
        self._arenas = []
        if lay.arena_bytes:
            self.offsets = np.ndarray(meta, np.int64, buf, lay.offsets_at)
            self.lengths = np.ndarray(meta, np.int64, buf, lay.lengths_at)
            self.route = np.ndarray(meta, np.int8, buf, lay.route_at)
            self.control = np.ndarray((CONTROL_WORDS,), np.float64, buf, lay.control_at)
            self._arenas = [np.ndarray((lay.arena_bytes,), np.uint8, buf, lay.arena_at + k * lay.arena_bytes)
                            for k in range(slots)]

    @classmethod
    def attach(cls, name: str, slots: int, batch: int, shape: Tuple[int, int, int], arena: int = 0) -> "Ring":
        """`arena=-1`: a device-decode ring, its arena size read from the block's size."""
        return cls(slots, batch, shape, name=name, create=False, arena=arena)

    def arena(self, slot: int) -> np.ndarray:
        """The `uint8[arena_bytes]` compressed-bytes arena of a slot (device decode only)."""
        return self._arenas[slot]

    @property
    def arena_per_image(self) -> int:
        return self.layout.arena_per_image

    def pixels(self, slot: int) -> np.ndarray:
        """The `uint8[B, H, W, 3]` pixel array of a slot (a view into shared memory)."""
        return self._pixels[slot]

    def buffer(self) -> memoryview:
        """The whole block, for backends that register it as pinned memory."""
        return self._buf

    @property
    def nbytes(self) -> int:
        return self.layout.size

    def close(self) -> None:
        """Drop the views; the owner also unlinks the block. Safe to call twice."""
        self.labels = self.indices = self.decode_ns = self.started = self.status = None  # type: ignore[assignment]
        self._pixels = []
        self.offsets = self.lengths = self.route = self.control = None
        self._arenas = []
        buf, self._buf = self._buf, None
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

    def __exit__(self, *exc) -> None:
        self.close()


def _attach(name: str, size: int):
    """Map an existing block without registering it with a resource tracker (workers never unlink)."""
    path = os.path.join(SHM_DIR, name)
    if os.path.isdir(SHM_DIR):
        fd = os.open(path, os.O_RDWR)
        try:
            return mmap.mmap(fd, size)
        finally:
            os.close(fd)
    from multiprocessing import shared_memory  # pragma: no cover - non-Linux

    try:
        shm = shared_memory.SharedMemory(name=name, track=False)  # Python 3.13+
    except TypeError:
        shm = shared_memory.SharedMemory(name=name)
    return shm.buf

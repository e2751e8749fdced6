"""The ring's shared-memory layout, per-image status codes and views: what both sides of the ring
need, the parent (engine/pipeline/ring.py, which creates and unlinks the block) and the processes
that attach to it (decode workers, preprocess/worker.py; device processes,
engine/pipeline/devices.py). Standard library and numpy only: nothing here imports `engine`.

NOTE [Slot ownership and shutdown] in engine/pipeline/ring.py says who may write what and when.
"""

from __future__ import annotations

import mmap
import os
from typing import Any, List, Tuple

import numpy as np

SHM_DIR = "/dev/shm"
NAME_PREFIX = "iengine-"
ALIGN = 4096

# per-image status, written by the workers (NOTE [Slot ownership and shutdown])
EMPTY, BUSY, OK, FAILED = 0, 1, 2, 3

# the control area of a device-decode ring: float64 words written by the parent, read by workers
CONTROL_WORDS = 8
CTRL_HOST_SHARE, CTRL_KINDS, CTRL_MAX_PIXELS = 0, 1, 2


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



class RingView:
    """Views over a ring block: per image a label, dataset index, decode times and status; per slot
    a `uint8[B, H, W, 3]` pixel array (and, for device decode, offsets, lengths, routes, a control
    area and byte arenas). `RingView.attach(name, ...)` maps a block another process created."""

    name: str = ""  # the block's name in /dev/shm
    # device decode's per-image arrays and control words: arrays in a ring with a byte arena, else None
    offsets: Any
    lengths: Any
    route: Any
    control: Any

    def __init__(self, buf, slots: int, batch: int, shape: Tuple[int, int, int], arena: int = 0):
        self.layout = Layout(slots, batch, shape, arena)
        self.slots, self.batch, self.shape = slots, batch, tuple(shape)
        self._set_views(buf)

    def _set_views(self, buf) -> None:
        lay, slots, batch = self.layout, self.slots, self.batch
        self._buf = buf
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
        self._arenas: List[np.ndarray] = []
        if lay.arena_bytes:
            self.offsets = np.ndarray(meta, np.int64, buf, lay.offsets_at)
            self.lengths = np.ndarray(meta, np.int64, buf, lay.lengths_at)
            self.route = np.ndarray(meta, np.int8, buf, lay.route_at)
            self.control = np.ndarray((CONTROL_WORDS,), np.float64, buf, lay.control_at)
            self._arenas = [np.ndarray((lay.arena_bytes,), np.uint8, buf, lay.arena_at + k * lay.arena_bytes)
                            for k in range(slots)]

    @classmethod
    def attach(cls, name: str, slots: int, batch: int, shape: Tuple[int, int, int], arena: int = 0) -> "RingView":
        """Map the block `name` another process created. `arena=-1`: a device-decode ring, its arena
        size read from the block's size."""
        if arena < 0:
            arena = arena_from_size(os.stat(os.path.join(SHM_DIR, name)).st_size, slots, batch, shape)
        lay = Layout(slots, batch, shape, arena)
        view = cls.__new__(cls)
        RingView.__init__(view, attach_block(name, lay.size), slots, batch, shape, arena)
        view.name = name
        return view

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

    def _drop_views(self):
        """Drop every view; returns the buffer they pointed into."""
        self.labels = self.indices = self.decode_ns = self.started = self.status = None
        self._pixels = []
        self.offsets = self.lengths = self.route = self.control = None
        self._arenas = []
        buf, self._buf = self._buf, None
        return buf

    def close(self) -> None:
        """Drop the views and unmap an attached block (never unlinks it). Safe to call twice."""
        buf = self._drop_views()
        if isinstance(buf, mmap.mmap):
            try:
                buf.close()
            except BufferError:
                pass

    def __enter__(self) -> "RingView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def attach_block(name: str, size: int):
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
        shm = shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]  # Python 3.13+
    except TypeError:
        shm = shared_memory.SharedMemory(name=name)
    return shm.buf

"""Reusable decode buffers, one per thread: no fresh allocation (and page faults) per image."""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["SCRATCH_KEEP", "scratch", "scratch_all"]

LOCAL = threading.local()

# Largest buffer scratch() keeps between images (an ImageNet image needs under 1 MiB): one huge
# image must not leave a worker holding its gigabyte for the rest of the run.
SCRATCH_KEEP = 64 << 20


def scratch_all() -> np.ndarray:
    """This thread's whole reusable buffer (at least 1 MiB), for a callee that says what it needs."""
    buf = getattr(LOCAL, "buf", None)
    return buf if buf is not None else scratch(1 << 20)


def scratch(nbytes: int) -> np.ndarray:
    """``nbytes`` of this thread's reusable buffer (grown as needed; over :data:`SCRATCH_KEEP`, a
    fresh array freed with the image)."""
    if nbytes > SCRATCH_KEEP:
        return np.empty(nbytes, dtype=np.uint8)  # freed with the image
    buf = getattr(LOCAL, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = np.empty(max(nbytes, 1 << 20), dtype=np.uint8)
        LOCAL.buf = buf
    return buf[:nbytes]

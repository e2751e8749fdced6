"""Small file helpers without heavy imports (run-score uses them before any backend loads torch)."""

from __future__ import annotations

import hashlib


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

"""The index of images inside containers: `Container` (per image, which file and where in it),
and what the readers of each kind share (failed entries, label checks, naming, the Dataset)."""


from __future__ import annotations

import hashlib
import os
import stat as stat_mod
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from engine.pipeline.images import Dataset, DatasetError, few
from preprocess.containers import FAILED, PARQUET, RANGE  # noqa: F401 (PARQUET: for the readers)

# `a` below -1: an index entry that is known bad before anything is read; `b` says why
NO_IMAGE, NOT_REGULAR, UNOPENED = 1, 2, 3


@dataclass(frozen=True)
class Container:
    """Per image: which file, and where in it (see the module docstring)."""

    layout: str                 # "tar", "wds", "parquet"
    read: str                   # RANGE or PARQUET (preprocess.containers)
    files: Tuple[str, ...]      # absolute local paths or URLs
    file_stats: Tuple[Tuple[int, int], ...]  # (size, mtime_ns) of each file when indexed
    file_ids: np.ndarray        # int32 [n]
    a: np.ndarray               # int64 [n]: byte offset | row group (-1: bad entry, see `b`)
    b: np.ndarray               # int64 [n]: byte length | row in its row group | why bad
    reasons: Tuple[str, ...] = ()  # UNOPENED entries: why, by `b - UNOPENED`

    def locator(self, i: int, name: str):
        a = int(self.a[i])
        if a < 0:  # failed by the index: the worker fails it with this reason, reading nothing
            return (FAILED, bad_reason(self, i), 0, 0, name)
        return (self.read, self.files[int(self.file_ids[i])], a, int(self.b[i]), name)

    def take(self, n: int) -> "Container":
        """The first n images (--limit)."""
        return Container(self.layout, self.read, self.files, self.file_stats, self.file_ids[:n], self.a[:n],
                         self.b[:n], self.reasons)

    def identity(self, names: Sequence[str], stat_dtype) -> Tuple[np.ndarray, np.ndarray]:
        """(size, mtime_ns, mode) and a 128-bit name hash per image, for the pixel cache: an image
        is its container file (its name, size and mtime), its position there and its size, so an
        edited shard is decoded again, as an edited file is."""
        n = len(names)
        out = np.zeros(n, stat_dtype)
        sizes = np.array([s for s, _ in self.file_stats], np.int64)
        mtimes = np.array([m for _, m in self.file_stats], np.int64)
        fid = self.file_ids.astype(np.int64)
        out["size"] = self.b if self.read == RANGE else sizes[fid]
        out["mtime_ns"] = mtimes[fid]
        out["mode"] = stat_mod.S_IFREG | 0o444
        bad = self.a < 0
        out["size"][bad] = -1  # never a hit: decided by the index, not cached
        phash = np.zeros((n, 2), np.uint64)
        for i, name in enumerate(names):
            f = int(fid[i])
            text = f"{name}\0{self.files[f]}\0{sizes[f]}\0{int(self.a[i])}\0{int(self.b[i])}"
            d = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).digest()
            phash[i] = (int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little"))
        return out, phash


def bad_reason(container: Container, i: int) -> Optional[str]:
    """Why index entry i is a failed image before anything is read (None: it is not)."""
    if container.a[i] >= 0:
        return None
    code = int(container.b[i])
    if code == NO_IMAGE:
        return "the sample has no image member (.jpg, .jpeg, .png or .webp)"
    if code == NOT_REGULAR:
        return "not a regular file in the tar (a link, a directory or a device entry)"
    return container.reasons[code - UNOPENED]


def finish(root: str, names: List[str], labels: List[int], container: Container, class_names, layout: str,
           limit: Optional[int]):
    """The Dataset over a container index, in index order (never sorted: file order)."""
    if not names:
        raise DatasetError(f"{root}: no images found")
    n = len(names) if limit is None else min(limit, len(names))
    c = container.take(n)
    return Dataset(root=root, paths=tuple(names[:n]), labels=np.asarray(labels[:n], np.int64),
                   class_names=tuple(class_names), layout=layout, container=c)


def check_labels(data: str, names: Sequence[str], labels: Sequence[int], container: Container,
                 num_classes: int, where: str) -> None:
    """Refuse, before the run, an image with no label or one out of the model's range."""
    missing = [names[i] for i, l in enumerate(labels)
               if l < 0 and not (container.a[i] < 0 and container.b[i] >= UNOPENED)]
    if missing:
        raise DatasetError(f"--data {data}: {len(missing)} image(s) have no label ({where}): {few(missing)}; "
                           "give labelled data, or score it with run-score")
    over = [(names[i], l) for i, l in enumerate(labels) if l >= num_classes]
    if over:
        shown = ", ".join(f"{n} has {l}" for n, l in over[:5])
        raise DatasetError(f"--data {data}: {len(over)} label(s) outside the model's {num_classes} classes "
                           f"({where}): {shown}")


def common_root(files: Sequence[str]) -> str:
    """The folder (or URL prefix) the shard names in reports are relative to."""
    from preprocess.containers import is_url

    if any(is_url(f) for f in files):
        heads = [f.rsplit("/", 1)[0] for f in files]
        root = heads[0]
        for h in heads[1:]:
            while not (h == root or h.startswith(root + "/")):
                root = root.rsplit("/", 1)[0]
        return root
    return os.path.commonpath([os.path.dirname(f) for f in files])


def shard_name(root: str, path: str) -> str:
    if "://" in path:
        return path[len(root):].lstrip("/")
    return os.path.relpath(path, root)

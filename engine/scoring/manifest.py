"""The frozen manifest of a scoring run: which images, in which order, under which ids.

A manifest is the sorted list of image paths (relative to the data root, `/`-separated) with
each file's size in bytes; an image's id is its position in that list. Its hash is the SHA-256
of the canonical lines

    <id> TAB <size> TAB <path>

(tab, newline, carriage return and backslash in a path escaped as \\t \\n \\r \\\\), so the same
files give the same hash on every machine, wherever the data is mounted: the root is recorded
but not hashed. Part `p` of a run holds ids `[p * part_size, (p + 1) * part_size)`; a shard
`i/n` owns a contiguous range of whole parts (`shard_parts`), so shards never overlap and
together cover every part, whatever `n` is.

Container data (a tar, WebDataset or Parquet shards: engine/pipeline/containers/) keeps its own
defined order (shards, then members or rows in file order) instead of being sorted; its paths
are names like `val-000003.tar:KEY` or `validation-00001.parquet:417`, its sizes the member's
bytes (-1 for a Parquet row: its size is known only by reading it), and the manifest carries
the container index the workers read by.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from engine.errors import UsageError
from engine.classes import imagenet_classes
from engine.pipeline.dataset import UNLABELLED, Dataset, DatasetError, build_unlabelled

MANIFEST_FILE = "manifest.tsv"
MAGIC = "# imagenet-engine manifest v1"

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {v: k for k, v in _ESCAPES.items()}
_NEEDS_ESCAPE = re.compile(r"[\\\t\n\r]")
_ESCAPED = re.compile(r"\\[\\tnr]")


class ManifestError(UsageError):
    """A manifest file is unreadable or does not match its hash; the message says which."""


class ShardError(UsageError):
    """A bad --shard, or a Slurm / RANK environment that names no valid shard."""


def _escape(path: str) -> str:
    return _NEEDS_ESCAPE.sub(lambda m: _ESCAPES[m.group(0)], path) if _NEEDS_ESCAPE.search(path) else path


def _unescape(text: str) -> str:
    return _ESCAPED.sub(lambda m: _UNESCAPES[m.group(0)], text) if "\\" in text else text


@dataclass(frozen=True)
class Manifest:
    """Sorted relative paths with sizes (-1: missing at listing time); id = position."""

    root: str
    paths: Tuple[str, ...]
    sizes: np.ndarray  # int64 [n]
    sha256: str
    container: Optional[Any] = None  # engine.pipeline.containers.Container, or None: loose files

    def __len__(self) -> int:
        return len(self.paths)

    def num_parts(self, part_size: int) -> int:
        return -(-len(self.paths) // part_size)

    def part_range(self, part: int, part_size: int) -> Tuple[int, int]:
        """Ids `[lo, hi)` of a part."""
        lo = part * part_size
        return lo, min(len(self.paths), lo + part_size)

    def dataset(self) -> Dataset:
        """The engine's index over the manifest: dataset index == manifest id."""
        names = tuple(name for _, name in imagenet_classes())
        labels = np.full(len(self.paths), UNLABELLED, np.int64)
        return Dataset(root=self.root, paths=self.paths, labels=labels, class_names=names, layout="unlabelled",
                       container=self.container)

    def text(self) -> str:
        """The manifest file: a header (not hashed) and the canonical lines (hashed)."""
        return _header(self.root, len(self.paths), self.sha256) + "".join(_lines(self.paths, self.sizes))


def _lines(paths: Iterable[str], sizes: Iterable[int]) -> Iterable[str]:
    for i, (p, s) in enumerate(zip(paths, sizes)):
        yield f"{i}\t{int(s)}\t{_escape(p)}\n"


def _hash(paths: Tuple[str, ...], sizes: np.ndarray) -> str:
    h = hashlib.sha256()
    chunk: List[str] = []
    for line in _lines(paths, sizes):
        chunk.append(line)
        if len(chunk) >= 65536:
            h.update("".join(chunk).encode("utf-8", "surrogateescape"))
            chunk.clear()
    h.update("".join(chunk).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _header(root: str, n: int, sha: str) -> str:
    return f"{MAGIC}\n# root\t{_escape(root)}\n# images\t{n}\n# sha256\t{sha}\n# id\tsize\tpath\n"


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1  # missing or unreadable now: its row will say why


def from_paths(root: str, rels: Iterable[str]) -> Manifest:
    """A manifest of these paths under `root`: sorted, duplicates dropped, sizes read now."""
    paths = tuple(sorted(set(rels)))
    sizes = np.fromiter((_size(os.path.join(root, p)) for p in paths), dtype=np.int64, count=len(paths))
    return Manifest(root=root, paths=paths, sizes=sizes, sha256=_hash(paths, sizes))


def build_manifest(data: str, limit: Optional[int] = None) -> Manifest:
    """Freeze the images under a folder (searched recursively) or listed in a text file.

    Sorted by relative path (plain string order); `limit` keeps the first N of that order.
    """
    try:
        ds = build_unlabelled(data)  # the listing, its checks and its messages
    except UnicodeDecodeError:
        raise DatasetError(f"--data {data}: not a text file (expected a folder, or one image path per line)")
    except OSError as e:
        raise DatasetError(f"--data {data}: cannot read ({e.strerror or e})")
    if ds.container is not None:
        return _from_container(ds, limit)
    rels = sorted(set(ds.paths))
    if limit is not None:
        rels = rels[:limit]
    return from_paths(ds.root, rels)


def _from_container(ds: Dataset, limit: Optional[int]) -> Manifest:
    from engine.pipeline.containers import RANGE

    n = len(ds) if limit is None else min(limit, len(ds))
    assert ds.container is not None
    c = ds.container.take(n)
    sizes = np.where(c.a >= 0, c.b, -1) if c.read == RANGE else np.full(n, -1, np.int64)
    paths = tuple(ds.paths[:n])
    sizes = np.asarray(sizes, np.int64)
    return Manifest(root=ds.root, paths=paths, sizes=sizes, sha256=_hash(paths, sizes), container=c)


def load_manifest(path: str, root: Optional[str] = None) -> Manifest:
    """Read a manifest file back and check it against the hash in its header."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            text = f.read()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read the manifest ({e.strerror or e})")
    header: Dict[str, str] = {}
    paths: List[str] = []
    sizes: List[int] = []
    lines = text.split("\n")
    if not lines or lines[0] != MAGIC:
        raise ManifestError(f"{path}: not an imagenet-engine manifest (first line {lines[0][:60]!r})")
    for number, line in enumerate(lines[1:], 2):
        if not line:
            continue
        if line.startswith("#"):
            key, _, value = line[2:].partition("\t")
            header[key] = value
            continue
        fields = line.split("\t", 2)
        if len(fields) != 3 or int(fields[0]) != len(paths):
            raise ManifestError(f"{path}:{number}: malformed manifest line {line[:80]!r}")
        sizes.append(int(fields[1]))
        paths.append(_unescape(fields[2]))
    size_arr = np.asarray(sizes, dtype=np.int64)
    sha = _hash(tuple(paths), size_arr)
    if header.get("sha256") != sha:
        raise ManifestError(f"{path}: the manifest's lines do not match its recorded hash (damaged file)")
    return Manifest(root=root or _unescape(header.get("root", "")), paths=tuple(paths), sizes=size_arr,
                    sha256=sha)


# -- shards ---------------------------------------------------------------------------------------
def shard_parts(num_parts: int, index: int, count: int) -> range:
    """The parts shard `index` of `count` owns: contiguous, disjoint, together all of them."""
    if not 0 <= index < count:
        raise ShardError(f"shard {index}/{count}: the index must be in 0..{count - 1}")
    return range(index * num_parts // count, (index + 1) * num_parts // count)


def parse_shard(text: str) -> Tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ShardError(f"--shard {text!r}: expected I/N, like 0/4 (shard I of N, counting from 0)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise ShardError(f"--shard {text}: needs 0 <= I < N")
    return i, n


def resolve_shard(text: Optional[str], environ: Mapping[str, str]) -> Tuple[int, int, str]:
    """(index, count, where it came from): --shard, else a Slurm array, else RANK/WORLD_SIZE, else 0/1."""
    if text:
        i, n = parse_shard(text)
        return i, n, "--shard"
    if environ.get("SLURM_ARRAY_TASK_ID") and environ.get("SLURM_ARRAY_TASK_COUNT"):
        task = int(environ["SLURM_ARRAY_TASK_ID"])
        n = int(environ["SLURM_ARRAY_TASK_COUNT"])
        first = int(environ.get("SLURM_ARRAY_TASK_MIN") or 0)
        step = int(environ.get("SLURM_ARRAY_TASK_STEP") or 1)
        i = (task - first) // max(step, 1)
        if not 0 <= i < n:
            raise ShardError(f"SLURM_ARRAY_TASK_ID={task} (min {first}, step {step}) is not one of "
                             f"{n} tasks; give --shard I/N")
        return i, n, "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
    if environ.get("RANK") and environ.get("WORLD_SIZE"):
        i, n = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        if n < 1 or not 0 <= i < n:
            raise ShardError(f"RANK={i} WORLD_SIZE={n}: needs 0 <= RANK < WORLD_SIZE; give --shard I/N")
        return i, n, "RANK/WORLD_SIZE"
    return 0, 1, "default"


__all__ = ["MANIFEST_FILE", "Manifest", "ManifestError", "ShardError", "DatasetError", "build_manifest", "from_paths",
           "load_manifest", "parse_shard", "resolve_shard", "shard_parts"]

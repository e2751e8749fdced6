"""Tar containers: a tar of images (flat or in class folders) and WebDataset shards.

The index of a tar is the offset and size of each member's data, read once from its headers
(tarfile, no member extracted) and kept in `<cache>/tar-index/` keyed by the file's path, size
and mtime, so the 50,000 headers of ILSVRC2012_img_val.tar are read once, not every run. The
workers then read a member with one pread (preprocess/containers.py).

Layouts, decided per tar from its members:
- WebDataset: a member named KEY.cls exists. Consecutive members with one KEY are a sample
  (webdataset's grouping: KEY is the name up to the first dot of its last part); the image is
  KEY.jpg|jpeg|png|webp, the label the integer in KEY.cls. Named `SHARD:KEY`.
- class folders: every image member sits in a folder (`n01440764/n01440764_10026.JPEG`, after a
  common leading folder): an ImageFolder, classes as engine/pipeline/dataset.py numbers folders.
- flat (ILSVRC2012_img_val.tar as shipped): labels from --labels (`val_label.txt` lines or the
  devkit), matched by member name. Named `SHARD:MEMBER`.
Refused with what to do: a compressed tar (gzip, bzip2, xz, zstd: no offsets to read at) and the
ImageNet train tar (a tar of per-class tars).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tarfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from engine.pipeline.containers.index import (NO_IMAGE, NOT_REGULAR, UNOPENED, Container, check_labels, finish,
                                              shard_name)
from engine.pipeline.images import DatasetError, few, imagenet_names, is_image_name
from engine.pipeline.containers.shards import COMPRESSED, file_stat
from preprocess.containers import RANGE, filesystem, is_url

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_VERSION = 1
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_MAGIC = ((b"\x1f\x8b", "gzip", "gunzip -k"), (b"BZh", "bzip2", "bunzip2 -k"),
          (b"\xfd7zXZ\x00", "xz", "unxz -k"), (b"\x28\xb5\x2f\xfd", "zstd", "zstd -d"))


class TarIndexError(OSError):
    """A tar's headers cannot be read (not a tar, or damaged before its first member)."""


def _err(msg: str):
    return DatasetError(msg)


def index_dir() -> str:
    base = os.environ.get("IMAGENET_ENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "imagenet-engine")
    return os.path.join(base, "tar-index")


def _open(path: str):
    if is_url(path):
        fs, p = filesystem(path)
        return fs.open(p, "rb", block_size=1 << 22)
    return open(path, "rb")


def compression(path: str) -> Optional[Tuple[str, str]]:
    """(name, command to undo it) when the file is a compressed stream."""
    with _open(path) as f:
        head = f.read(8)
    for magic, name, cmd in _MAGIC:
        if head.startswith(magic):
            return name, cmd
    return None


def scan(path: str, size: int, log=None) -> Dict[str, np.ndarray]:
    """Read every header of a tar: names, data offsets and sizes, regular or not, and the
    integer in each small `.cls` member (-2: none, -3: not an integer)."""
    names: List[str] = []
    offsets: List[int] = []
    sizes: List[int] = []
    regular: List[bool] = []
    cls: List[int] = []
    log = log if log is not None else sys.stderr
    t0 = last = time.monotonic()
    with _open(path) as f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            raise TarIndexError(f"not a tar file ({e})") from None
        while True:
            try:
                m = tf.next()
            except tarfile.ReadError:
                break  # damaged after the last whole header: what was read is the index
            if m is None:
                break
            tf.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every TarInfo; the index needs few
            name = m.name[2:] if m.name.startswith("./") else m.name
            if m.isdir():
                continue
            value = -2
            if m.isreg() and name.lower().endswith(".cls") and m.size <= 64:
                f.seek(m.offset_data)
                text = f.read(m.size)
                try:
                    value = int(text.decode("ascii").strip())
                except (UnicodeDecodeError, ValueError):
                    value = -3
            names.append(name)
            offsets.append(m.offset_data)
            sizes.append(m.size)
            regular.append(m.isreg())
            cls.append(value)
            now = time.monotonic()
            if now - last > 5:
                last = now
                print(f"indexing {os.path.basename(path)}: {len(names):,} members, "
                      f"{100 * m.offset_data / max(size, 1):.0f}%", file=log, flush=True)
    if now_long(t0):
        print(f"indexed {os.path.basename(path)}: {len(names):,} members in {time.monotonic() - t0:.1f} s "
              f"(kept in {index_dir()})", file=log, flush=True)
    return {"names": np.array(names, dtype=str), "offsets": np.array(offsets, np.int64),
            "sizes": np.array(sizes, np.int64), "regular": np.array(regular, bool), "cls": np.array(cls, np.int64)}


def now_long(t0: float) -> bool:
    return time.monotonic() - t0 > 1.0


def load_index(path: str, stat: Tuple[int, int], log=None) -> Dict[str, np.ndarray]:
    """The tar's index: from the cache when its size and mtime are unchanged, else scanned (and kept)."""
    key = hashlib.blake2b(f"{INDEX_VERSION}\0{path}\0{stat[0]}\0{stat[1]}".encode("utf-8", "surrogateescape"),
                          digest_size=16).hexdigest()
    where = os.path.join(index_dir(), key + ".npz")
    try:
        with np.load(where, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        pass
    index = scan(path, stat[0], log)
    try:
        os.makedirs(index_dir(), exist_ok=True)
        tmp = f"{where}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **index)  # type: ignore[arg-type]  # numpy's stub types **kwds as the allow_pickle flag
        os.replace(tmp, where)
    except OSError as e:
        print(f"warning: cannot keep the index of {path} in {index_dir()} ({e.strerror or e}); it is read again "
              "next run", file=log or sys.stderr)
    return index


def _split(name: str) -> Tuple[str, str]:
    m = _KEY.match(name)
    return (m.group(1), m.group(2)) if m else (name, "")


class _Rows:
    """The index of a run, built shard by shard."""

    def __init__(self):
        self.names: List[str] = []
        self.labels: List[int] = []
        self.fids: List[int] = []
        self.a: List[int] = []
        self.b: List[int] = []
        self.members: List[str] = []  # the member name (flat and folder layouts: what labels match)
        self.reasons: List[str] = []

    def add(self, name: str, label: int, fid: int, a: int, b: int, member: str = "") -> None:
        self.names.append(name)
        self.labels.append(label)
        self.fids.append(fid)
        self.a.append(a)
        self.b.append(b)
        self.members.append(member)

    def unopened(self, name: str, fid: int, reason: str) -> None:
        self.add(name, -1, fid, -1, UNOPENED + len(self.reasons))
        self.reasons.append(reason)


def _wds(rows: _Rows, shard: str, fid: int, ix) -> None:
    names, offsets, sizes, regular, cls = ix["names"], ix["offsets"], ix["sizes"], ix["regular"], ix["cls"]
    key = None
    image = None  # (offset, size, regular)
    label = -1

    def flush():
        if key is None or (image is None and label == -1):
            return  # a sample with neither an image nor a label (metadata only): not an image
        name = f"{shard}:{key}"
        if label == -3:
            raise _err(f"{name}: its .cls member does not hold a class index (an integer)")
        if image is None:
            rows.add(name, label, fid, -1, NO_IMAGE)
        elif not image[2]:
            rows.add(name, label, fid, -1, NOT_REGULAR)
        else:
            rows.add(name, label, fid, image[0], image[1])

    for i in range(len(names)):
        k, ext = _split(str(names[i]))
        if k != key:
            flush()
            key, image, label = k, None, -1
        low = ext.lower()
        if low == "cls":
            label = int(cls[i]) if cls[i] != -2 else -3
        elif low in WDS_IMAGE_EXTENSIONS and image is None:
            image = (int(offsets[i]), int(sizes[i]), bool(regular[i]))
    flush()


def _members(rows: _Rows, shard: str, fid: int, ix) -> None:
    for name, off, size, reg in zip(ix["names"], ix["offsets"], ix["sizes"], ix["regular"]):
        name = str(name)
        if not is_image_name(name):
            continue
        if reg:
            rows.add(f"{shard}:{name}", -1, fid, int(off), int(size), name)
        else:
            rows.add(f"{shard}:{name}", -1, fid, -1, NOT_REGULAR, name)


def _class_of(members: List[str]) -> Optional[List[str]]:
    """The class folder of each member when every one sits in a folder (after common leading
    folders, like `val/`), else None (a flat tar)."""
    parts = [m.split("/") for m in members if m]
    if not parts or any(len(p) < 2 for p in parts):
        return None
    depth = 0
    while all(len(p) > depth + 2 for p in parts) and len({p[depth] for p in parts}) == 1:
        depth += 1
    return [p[depth] for p in parts]


def tar_dataset(data: str, files: List[str], root: str, labels: Optional[str], limit: Optional[int],
                num_classes: int, labelled: bool):
    rows = _Rows()
    stats: List[Tuple[int, int]] = []
    layouts = set()
    for fid, path in enumerate(files):
        shard = shard_name(root, path)
        if path.lower().endswith(COMPRESSED):
            raise _err(f"--data {data}: {shard} is a compressed tar, which cannot be read by offset; decompress "
                       "it once (gunzip -k, unxz -k, zstd -d) and give the .tar")
        try:
            st = file_stat(path)
            packed = compression(path)
            if packed is not None:
                raise _err(f"--data {data}: {shard} is a {packed[0]}-compressed tar, which cannot be read by "
                           f"offset; decompress it once ({packed[1]} {shard}) and give the .tar")
            ix = load_index(path, st)
        except (OSError, TarIndexError) as e:
            if len(files) == 1:
                raise _err(f"--data {data}: cannot read {shard} as a tar ({getattr(e, 'strerror', None) or e})")
            stats.append((-1, -1))
            rows.unopened(shard, fid, f"the shard {shard} cannot be opened ({getattr(e, 'strerror', None) or e})")
            continue
        stats.append(st)
        names = [str(n) for n in ix["names"]]
        if names and all(n.lower().endswith(".tar") for n in names):
            raise _err(f"--data {data}: {shard} is a tar of tars (the ImageNet train tar: one tar per class); "
                       f"unpack it into class folders (mkdir train && tar -xf {shard} -C train && "
                       "cd train && for t in *.tar; do mkdir ${t%.tar} && tar -xf $t -C ${t%.tar} && rm $t; done) "
                       "and give that folder")
        if any(n.lower().endswith(".cls") for n in names):
            layouts.add("wds")
            _wds(rows, shard, fid, ix)
        else:
            layouts.add("tar")
            _members(rows, shard, fid, ix)
    if len(layouts) > 1:
        raise _err(f"--data {data}: mixes WebDataset shards (with .cls members) and tars of plain images")
    layout = layouts.pop() if layouts else "tar"
    container = Container(layout, RANGE, tuple(files), tuple(stats), np.asarray(rows.fids, np.int32),
                          np.asarray(rows.a, np.int64), np.asarray(rows.b, np.int64), tuple(rows.reasons))
    names_1k = imagenet_names() if num_classes == 1000 else tuple(str(i) for i in range(num_classes))
    if not labelled:
        return finish(root, rows.names, [-1] * len(rows.names), container, names_1k, "unlabelled", limit)
    if layout == "wds":
        if labels is not None:
            raise _err(f"--labels {labels}: WebDataset shards carry their labels (KEY.cls); leave --labels out")
        check_labels(data, rows.names, rows.labels, container, num_classes, "WebDataset KEY.cls")
        return finish(root, rows.names, rows.labels, container, names_1k, "wds", limit)
    real = [i for i, a in enumerate(rows.a) if not (a < 0 and rows.b[i] >= UNOPENED)]
    classes = _class_of([rows.members[i] for i in real]) if labels is None else None
    if classes is not None:
        from engine.classes import wnid_to_index

        table = wnid_to_index()
        found = sorted(set(classes))
        if all(c in table for c in found):
            index_of, class_names = {c: table[c] for c in found}, imagenet_names()
        else:
            index_of, class_names = {c: i for i, c in enumerate(found)}, tuple(found)
        for i, c in zip(real, classes):
            rows.labels[i] = index_of[c]
        check_labels(data, rows.names, rows.labels, container, num_classes, "class folders in the tar")
        return finish(root, rows.names, rows.labels, container, class_names, "tar-folder", limit)
    if labels is None:
        raise _err(f"--data {data}: a tar of images with no class folders and no .cls members; give --labels "
                   "FILE (lines 'FILENAME INDEX', like val_label.txt, or ILSVRC2012_devkit_t12.tar.gz)")
    _match_labels(rows, real, labels, data, num_classes)
    check_labels(data, rows.names, rows.labels, container, num_classes, f"--labels {labels}")
    return finish(root, rows.names, rows.labels, container, names_1k, "tar", limit)


def _match_labels(rows: _Rows, real: List[int], labels: str, data: str, num_classes: int) -> None:
    """Labels of a flat tar's members by member name (or its stem), as a flat folder's files."""
    from engine.pipeline.containers.devkit import read_labels

    entries = read_labels(labels)
    by_name: Dict[str, int] = {}
    by_stem: Dict[str, int] = {}
    for name, label in entries:
        base = os.path.basename(name)
        if base in by_name and by_name[base] != label:
            raise _err(f"--labels {labels}: {name} is listed twice with labels {by_name[base]} and {label}")
        by_name[base] = label
        by_stem.setdefault(os.path.splitext(base)[0], label)
    unlabelled = []
    used = set()
    for i in real:
        base = os.path.basename(rows.members[i])
        stem = os.path.splitext(base)[0]
        if base in by_name:
            rows.labels[i] = by_name[base]
            used.add(base)
        elif stem in by_stem:
            rows.labels[i] = by_stem[stem]
            used.add(stem)
        else:
            unlabelled.append(rows.names[i])
    if unlabelled:
        raise _err(f"--data {data}: {len(unlabelled)} image(s) have no line in --labels {labels}: "
                   f"{few(unlabelled)} (add them to the label file)")
    missing = [n for n, _ in entries
               if os.path.basename(n) not in used and os.path.splitext(os.path.basename(n))[0] not in used]
    if missing and len(missing) == len(entries):
        raise _err(f"--labels {labels} names none of the images in {data} (first: {few(missing)})")
    if missing:  # a truncated tar lost them, or the label file is for a bigger set
        print(f"warning: --labels {labels} names {len(missing)} image(s) that are not in {data}: {few(missing)}",
              file=sys.stderr)

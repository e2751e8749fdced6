"""Building the index of a run: which files, in which order, with which labels.

Layouts:
- ImageFolder: `DIR/<class>/<image>` (what `valprep.sh` produces). Folder names that are all
  ImageNet wnids get the standard ImageNet indices, so a subset of classes still scores
  correctly; other names are sorted and numbered like torchvision's ImageFolder.
- Flat folder plus a label file, one `FILENAME INDEX` per line (the reference's
  `val_label.txt`); the file name may lack its extension.
- Unlabelled: a folder searched recursively, or a text file with one path per line (scoring).
- Containers (a tar of images, WebDataset shards, Parquet shards, in object storage too):
  engine/pipeline/containers/, which the two builders below hand such a `--data` to.

The order is fixed: by file name, then by relative path, so `--limit N` takes the first N
validation images (`ILSVRC2012_val_00000001` onward), which span all classes.

Odd entries, as torchvision's ImageFolder, except where it would crash or loop:
- a broken symlink with an image name is listed (torchvision lists it too, then crashes on it);
  the worker fails it with the reason "broken symlink".
- a directory with an image name (`x.JPEG/`) is listed as an image, so the run fails it with
  the reason "is a directory" instead of silently dropping it (torchvision drops it); its
  contents are still walked, as torchvision does. So the count can exceed torchvision's by the
  number of such directories, and the exit status says that images failed.
- symlinked folders are followed (followlinks, as torchvision), but a link to a folder above it
  (a loop, which torchvision follows until the kernel says ELOOP, listing the same images dozens of
  times) is not, and each real folder is entered once per class.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from engine.classes import imagenet_classes, wnid_to_index

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LABEL_FILE_NAMES = ("val_label.txt",)
UNLABELLED = -1


class DatasetError(ValueError):
    """The data or label paths are unusable; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Dataset:
    """An ordered list of image files (relative to `root`) with integer labels (-1: none)."""

    root: str
    paths: Tuple[str, ...]
    labels: np.ndarray
    class_names: Tuple[str, ...]  # display name per class index
    layout: str
    # engine.pipeline.containers.Container: where each image's bytes are in tar or Parquet files
    # (then `paths` are names like `val-000003.tar:KEY`); None: loose files under `root`
    container: Optional[Any] = None

    def __len__(self) -> int:
        return len(self.paths)

    def abspath(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def locator(self, i: int):
        """What a worker reads image i by (preprocess/containers.py): a path, or a container position."""
        if self.container is None:
            return os.path.join(self.root, self.paths[i])
        return self.container.locator(i, self.paths[i])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _sort_key(rel: str) -> Tuple[str, str]:
    return (os.path.basename(rel), rel)


def _finish(root: str, pairs: List[Tuple[str, int]], class_names, layout: str, limit: Optional[int]) -> Dataset:
    if not pairs:
        raise DatasetError(f"{root}: no images found (looked for {', '.join(IMG_EXTENSIONS)})")
    pairs.sort(key=lambda p: _sort_key(p[0]))
    if limit is not None:
        pairs = pairs[:limit]
    paths = tuple(p for p, _ in pairs)
    labels = np.fromiter((l for _, l in pairs), dtype=np.int64, count=len(pairs))
    return Dataset(root=root, paths=paths, labels=labels, class_names=tuple(class_names), layout=layout)


def _imagenet_names() -> Tuple[str, ...]:
    return tuple(name for _, name in imagenet_classes())


def _image_folder(root: str, class_dirs: Sequence[str], limit: Optional[int]) -> Dataset:
    table = wnid_to_index()
    if all(d in table for d in class_dirs):
        index_of = {d: table[d] for d in class_dirs}
        names = _imagenet_names()
    else:
        index_of = {d: i for i, d in enumerate(sorted(class_dirs))}
        names = tuple(sorted(class_dirs))
    pairs: List[Tuple[str, int]] = []
    for d in class_dirs:
        base = os.path.join(root, d)
        for dirpath, names_ in _walk_images(base):
            for name in names_:
                pairs.append((os.path.relpath(os.path.join(dirpath, name), root), index_of[d]))
    return _finish(root, pairs, names, "folder", limit)


def _link_to_ancestor(path: str, here: str) -> bool:
    """A symlinked folder that points at the folder holding it or above: a loop."""
    if not os.path.islink(path):
        return False
    target = os.path.realpath(path)
    return here == target or here.startswith(target.rstrip(os.sep) + os.sep)


def _walk_images(base: str):
    """(dirpath, [image names]) under `base`: files and directories with an image extension
    (a directory is failed by the worker, see the module docstring). Symlinks are followed, but
    each real directory is entered once."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        try:
            st = os.stat(dirpath)
            key = (st.st_dev, st.st_ino)
        except OSError:
            key = None
        if key is not None and key in seen:
            dirnames[:] = []  # a symlink loop, or a second link to a folder already listed
            continue
        seen.add(key)
        here = os.path.realpath(dirpath)
        dirnames[:] = [n for n in dirnames if not _link_to_ancestor(os.path.join(dirpath, n), here)]
        dirnames.sort()
        images = [n for n in filenames if _is_image_name(n)] + [n for n in dirnames if _is_image_name(n)]
        yield dirpath, images


def read_label_file(path: str) -> List[Tuple[str, int]]:
    """Parse `FILENAME INDEX` lines; blank lines and `#` comments are skipped."""
    entries: List[Tuple[str, int]] = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DatasetError(f"--labels {path}: cannot read ({e.strerror or e})")
    except UnicodeDecodeError:
        raise DatasetError(f"--labels {path}: not a text file (expected lines 'FILENAME INDEX')")
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(None, 1)
        if len(parts) != 2:
            raise DatasetError(f"--labels {path}:{number}: expected 'FILENAME INDEX', got {line!r}")
        name, index = parts
        try:
            label = int(index)
        except ValueError:
            raise DatasetError(f"--labels {path}:{number}: class index {index!r} is not an integer")
        if label < 0:
            raise DatasetError(f"--labels {path}:{number}: class index {label} is negative")
        entries.append((name, label))
    if not entries:
        raise DatasetError(f"--labels {path}: no 'FILENAME INDEX' lines")
    return entries


def read_labels(path: str) -> List[Tuple[str, int]]:
    """`--labels`: `FILENAME INDEX` lines, or the ImageNet devkit (ILSVRC2012_devkit_t12.tar.gz)."""
    from engine.pipeline.containers.devkit import devkit_labels, is_devkit

    if is_devkit(path):
        return devkit_labels(path)
    return read_label_file(path)


def _few(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _flat_with_labels(root: str, label_file: str, limit: Optional[int], num_classes: int) -> Dataset:
    entries = read_labels(label_file)
    label_path = os.path.abspath(label_file)
    # a directory with an image name stays, so that a label line naming it is a failed image
    files = sorted(
        n for n in os.listdir(root)
        if os.path.join(root, n) != label_path and (_is_image_name(n) or not os.path.isdir(os.path.join(root, n)))
    )
    by_name = {n: n for n in files}
    by_stem = {}
    for n in files:
        by_stem.setdefault(os.path.splitext(n)[0], n)
    pairs: List[Tuple[str, int]] = []
    seen = {}
    missing = []
    for name, label in entries:
        found = by_name.get(name) or by_stem.get(name) or by_stem.get(os.path.splitext(name)[0])
        if found is None:
            missing.append(name)
            continue
        if found in seen:
            if seen[found] != label:
                raise DatasetError(f"--labels {label_file}: {name} is listed twice with labels {seen[found]} and {label}")
            continue
        if label >= num_classes:
            raise DatasetError(
                f"--labels {label_file}: {name} has class index {label}, but the model has {num_classes} classes"
            )
        seen[found] = label
        pairs.append((found, label))
    if missing:
        raise DatasetError(
            f"--labels {label_file} names {len(missing)} file(s) that are not in {root}: {_few(missing)}"
        )
    unlabelled = [n for n in files if _is_image_name(n) and n not in seen and not os.path.isdir(os.path.join(root, n))]
    if unlabelled:
        raise DatasetError(
            f"{root}: {len(unlabelled)} image(s) have no line in --labels {label_file}: {_few(unlabelled)}"
            " (add them to the label file, or move them out of the folder)"
        )
    names = _imagenet_names() if num_classes == 1000 else tuple(str(i) for i in range(num_classes))
    return _finish(root, pairs, names, "flat", limit)


def build_dataset(data: Optional[str], labels: Optional[str] = None, limit: Optional[int] = None,
                  num_classes: int = 1000) -> Dataset:
    """The labelled index of `data` (ImageFolder, or a flat folder with a label file, or a container)."""
    if not data:
        raise DatasetError("--data is required: a folder of class folders, or a flat folder with --labels")
    from engine.pipeline.containers import open_container

    found = open_container(data, labels, limit, num_classes)
    if found is not None:
        return found
    root = os.path.abspath(data)
    if not os.path.exists(root):
        raise DatasetError(f"--data {data}: no such folder")
    if not os.path.isdir(root):
        raise DatasetError(f"--data {data}: not a folder")
    if labels is not None:
        if not os.path.isfile(labels):
            raise DatasetError(f"--labels {labels}: no such file")
        return _flat_with_labels(root, labels, limit, num_classes)
    entries = sorted(os.listdir(root))
    class_dirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    if class_dirs:
        return _image_folder(root, class_dirs, limit)
    for name in LABEL_FILE_NAMES:
        if name in entries:
            return _flat_with_labels(root, os.path.join(root, name), limit, num_classes)
    if any(_is_image_name(e) for e in entries):
        raise DatasetError(
            f"--data {data}: images but no class folders and no label file; give --labels FILE"
            " (lines 'FILENAME INDEX') or arrange the images as DIR/<class>/<image>"
        )
    raise DatasetError(f"--data {data}: empty folder (no class folders, no images)")


def build_unlabelled(data: str, limit: Optional[int] = None) -> Dataset:
    """Every image under a folder (recursively) or listed in a text file, for scoring."""
    from engine.pipeline.containers import open_container

    found = open_container(data, None, limit, 1000, labelled=False)
    if found is not None:
        return found
    root = os.path.abspath(data)
    if not os.path.exists(root):
        raise DatasetError(f"--data {data}: no such file or folder")
    rels: List[str] = []
    if os.path.isdir(root):
        for dirpath, images in _walk_images(root):
            rels.extend(os.path.relpath(os.path.join(dirpath, n), root) for n in images)
        base = root
    else:
        base = os.path.dirname(root)
        with open(root, encoding="utf-8") as f:
            for line in f:
                p = line.strip()
                if p and not p.startswith("#"):
                    rels.append(os.path.relpath(os.path.join(base, p), base) if not os.path.isabs(p) else p)
    pairs = [(r, UNLABELLED) for r in rels]
    return _finish(base, pairs, _imagenet_names(), "unlabelled", limit)

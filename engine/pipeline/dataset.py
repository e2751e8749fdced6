"""Building the index of a run: which files, in which order, with which labels.

Layouts:
- ImageFolder: `DIR/<class>/<image>` (what `valprep.sh` produces). Folder names that are all
  ImageNet wnids get the standard ImageNet indices, so a subset of classes still scores
  correctly; folder names that are all class numbers (`0`..`999`, ImageNet-V2's layout) are
  their own index (sorted as names, `10` would come before `2`); other names are sorted and
  numbered like torchvision's ImageFolder.
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
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from engine.classes import wnid_to_index
from engine.pipeline.containers.devkit import read_labels
from engine.pipeline.images import (IMG_EXTENSIONS, LABEL_FILE_NAMES, UNLABELLED, Dataset,  # noqa: F401 (the API)
                                    DatasetError, few as _few, imagenet_names as _imagenet_names,
                                    is_image_name as _is_image_name, read_label_file)

def _sort_key(rel: str) -> Tuple[str, str]:
    return (os.path.basename(rel), rel)


def _finish(root: str, pairs: List[Tuple[str, int]], class_names, layout: str, limit: Optional[int]) -> Dataset:
    if not pairs:
        raise DatasetError(f"{root}: no images found (looked for {', '.join(IMG_EXTENSIONS)})")
    pairs.sort(key=lambda p: _sort_key(p[0]))
    if limit is not None:
        pairs = pairs[:limit]
    paths = tuple(p for p, _ in pairs)
    labels = np.fromiter((label for _, label in pairs), dtype=np.int64, count=len(pairs))
    return Dataset(root=root, paths=paths, labels=labels, class_names=tuple(class_names), layout=layout)


def numbered(folders: Sequence[str]) -> bool:
    """Folder names that are all class numbers (`0`, `1`, ... `999`): ImageNet-V2's layout."""
    return bool(folders) and all(f.isdigit() and (f == "0" or not f.startswith("0")) for f in folders)


def _image_folder(root: str, class_dirs: Sequence[str], limit: Optional[int], num_classes: int = 1000) -> Dataset:
    table = wnid_to_index()
    if all(d in table for d in class_dirs):
        index_of = {d: table[d] for d in class_dirs}
        names = _imagenet_names()
    elif numbered(class_dirs):  # ImageNet-V2: the folder's number is the class index
        index_of = {d: int(d) for d in class_dirs}
        top = max(index_of.values())
        if top >= num_classes:
            raise DatasetError(f"--data {root}: class folder {top} is not below the model's {num_classes} classes "
                               "(numbered folders are class indices, as in ImageNet-V2)")
        names = _imagenet_names() if num_classes == 1000 else tuple(str(i) for i in range(num_classes))
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


def _flat_with_labels(root: str, label_file: str, limit: Optional[int], num_classes: int) -> Dataset:
    entries = read_labels(label_file)
    label_path = os.path.abspath(label_file)
    # a directory with an image name stays, so that a label line naming it is a failed image
    files = sorted(
        n for n in os.listdir(root)
        if os.path.join(root, n) != label_path and (_is_image_name(n) or not os.path.isdir(os.path.join(root, n)))
    )
    by_name = {n: n for n in files}
    by_stem: Dict[str, str] = {}
    for n in files:
        by_stem.setdefault(os.path.splitext(n)[0], n)
    pairs: List[Tuple[str, int]] = []
    seen: Dict[str, int] = {}
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
        return _image_folder(root, class_dirs, limit, num_classes)
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

"""Validation labels from the ImageNet devkit (`ILSVRC2012_devkit_t12.tar.gz`), as torchvision reads it.

The devkit's `data/ILSVRC2012_validation_ground_truth.txt` gives, for ILSVRC2012_val_00000001
onward, an ILSVRC2012 id (1..1000). Those ids follow `data/meta.mat`'s order, which is NOT the
sorted wnid order the models' outputs use: id -> wnid comes from meta.mat (its leaf synsets,
num_children == 0, read with scipy.io.loadmat as torchvision's `parse_meta_mat`), and wnid ->
class index from the package's class list (sorted wnids, torchvision's ImageFolder order).
"""

from __future__ import annotations

import io
import os
import tarfile
from typing import Dict, List, Tuple

from engine.classes import wnid_to_index
from engine.pipeline.images import DatasetError, read_label_file

META = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"


def _err(msg: str):
    return DatasetError(msg)


def is_devkit(path: str) -> bool:
    name = os.path.basename(path).lower()
    return "devkit" in name and name.endswith((".tar.gz", ".tgz", ".tar"))


def meta_ids(data: bytes, where: str) -> Dict[int, str]:
    """ILSVRC2012 id -> wnid from meta.mat's leaf synsets."""
    try:
        import scipy.io as sio
    except ImportError:
        raise _err(f"--labels {where}: reading the devkit's meta.mat needs scipy: pip install imagenet-engine[devkit]"
                   " (or give the labels as 'FILENAME INDEX' lines, like val_label.txt)") from None
    try:
        synsets = sio.loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
    except (ValueError, KeyError, TypeError) as e:
        raise _err(f"--labels {where}: its {META} is not the devkit's synset table ({e})") from None
    out: Dict[int, str] = {}
    for row in synsets:
        if int(row[4]) == 0:  # num_children: the 1,000 leaves are the classes
            out[int(row[0])] = str(row[1])
    return out


def devkit_labels(path: str) -> List[Tuple[str, int]]:
    """(`ILSVRC2012_val_%08d`, class index) for each validation image the devkit labels."""
    try:
        with tarfile.open(path, "r:*") as tf:
            found = {}
            for m in tf:
                for want in (META, GROUND_TRUTH):
                    if m.isreg() and (m.name.endswith("/" + want) or m.name == want):
                        f = tf.extractfile(m)
                        found[want] = f.read() if f is not None else b""
    except (OSError, tarfile.TarError) as e:
        raise _err(f"--labels {path}: cannot read the devkit ({e})") from None
    missing = [w for w in (META, GROUND_TRUTH) if w not in found]
    if missing:
        raise _err(f"--labels {path}: not the ILSVRC2012 devkit (no {', '.join(missing)} inside)")
    ids = meta_ids(found[META], path)
    table = wnid_to_index()
    entries: List[Tuple[str, int]] = []
    for number, line in enumerate(found[GROUND_TRUTH].decode("ascii", "replace").split(), 1):
        try:
            wnid = ids[int(line)]
        except (ValueError, KeyError):
            raise _err(f"--labels {path}: {GROUND_TRUTH} line {number}: {line!r} is not an id of meta.mat's "
                       "classes") from None
        if wnid not in table:
            raise _err(f"--labels {path}: {wnid} (id {line}) is not an ImageNet-1k class")
        entries.append(("ILSVRC2012_val_%08d" % number, table[wnid]))
    return entries


def read_labels(path: str) -> List[Tuple[str, int]]:
    """`--labels`: `FILENAME INDEX` lines, or the ImageNet devkit (ILSVRC2012_devkit_t12.tar.gz)."""
    if is_devkit(path):
        return devkit_labels(path)
    return read_label_file(path)

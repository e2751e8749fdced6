"""Label sets: which labels an evaluation counts against, and which model outputs may win.

- ReaL (`--real-labels`): the reassessed labels of ImageNet val (Beyer et al., 2020), a list of
  correct classes per val image, found by the image's `ILSVRC2012_val_%08d` file name. An image
  with an empty list is left out; a prediction is correct when it is in the list.
- Class subsets (`--class-subset auto|present|none`): ImageNet-A and ImageNet-R have 200 of the
  1,000 classes; a 1,000-way model is scored on those 200 outputs only (the logits of the other
  800 are set to -inf before top-k). `auto` does so when the data set's wnid folders are exactly
  one of those two lists; `present` restricts to the classes of the run's images, whatever they
  are; `none` never restricts.
- The label set a data set is (`detect`): ImageNet val, V2 (folders `0`..`999`, mapped by
  number in engine/pipeline/dataset.py), A, R, Sketch (1,000 wnid folders, no val file names),
  or another set; it picks the published figures to show beside the run's (`published_for`).
- `--class-map FILE`: lines `FOLDER CLASS` (CLASS a model index or a wnid) for any other mapping.

The data files ship in engine/data/ (see engine/data/LICENSES.md).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import numpy as np

from engine.classes import imagenet_classes, wnid_to_index
from engine.pipeline.dataset import Dataset, DatasetError, numbered
from engine.pipeline.images import read_pairs

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
REAL_JSON = os.path.join(DATA_DIR, "real.json")
SUBSET_FILES = {"imagenet-a": "imagenet_a_synsets.txt", "imagenet-r": "imagenet_r_synsets.txt"}
CLASS_SUBSETS = ("auto", "present", "none")
# `--real-labels` with no FILE: the copy shipped in the package
REAL_PACKAGED = "<packaged>"
VAL_ID = re.compile(r"ILSVRC2012_val_(\d{8})")
_WNID = re.compile(r"n\d{8}\Z")

# label set -> timm's results table (huggingface/pytorch-image-models `results/`)
TIMM_TABLES = {
    "imagenet": "results-imagenet.csv",
    "real": "results-imagenet-real.csv",
    "imagenet-v2": "results-imagenetv2-matched-frequency.csv",
    "imagenet-a": "results-imagenet-a.csv",
    "imagenet-r": "results-imagenet-r.csv",
    "imagenet-sketch": "results-sketch.csv",
}
LABEL_SET_NAMES = {
    "imagenet": "ImageNet val",
    "imagenet-v2": "ImageNet-V2 (numbered class folders, mapped by number)",
    "imagenet-a": "ImageNet-A (its 200 wnid folders)",
    "imagenet-r": "ImageNet-R (its 200 wnid folders)",
    "imagenet-sketch": "ImageNet-Sketch (1,000 wnid folders, no val file names)",
    "class-map": "classes mapped by --class-map",
    "other": "class folders of its own (sorted and numbered)",
}


class LabelSetError(DatasetError):
    """A label file or class option does not fit the data set; the message says what to change."""


@functools.lru_cache(maxsize=None)
def subset_wnids(name: str) -> Tuple[str, ...]:
    """The 200 wnids of "imagenet-a" or "imagenet-r", sorted."""
    with open(os.path.join(DATA_DIR, SUBSET_FILES[name]), encoding="utf-8") as f:
        return tuple(sorted(line.strip() for line in f if line.strip()))


def class_folders(root: str) -> List[str]:
    """The class folder names directly under `root` (sorted)."""
    try:
        return sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
    except OSError:
        return []


def detect(ds: Dataset, class_map: Optional[str] = None) -> str:
    """The label set `ds` is (a key of LABEL_SET_NAMES)."""
    if class_map:
        return "class-map"
    if ds.layout != "folder":
        return "imagenet" if ds.layout == "flat" else "other"
    folders = class_folders(ds.root)
    if numbered(folders):
        return "imagenet-v2"
    for name in SUBSET_FILES:
        if tuple(folders) == subset_wnids(name):
            return name
    table = wnid_to_index()
    if folders and all(f in table for f in folders):
        if len(folders) == len(table) and not any(VAL_ID.search(os.path.basename(p)) for p in ds.paths[:100]):
            return "imagenet-sketch"
        return "imagenet"
    return "other"


def class_mask(mode: str, label_set: str, ds: Dataset, num_classes: int) -> Tuple[Optional[np.ndarray], str]:
    """(bool mask of the model outputs that may win, or None for all; why), for `--class-subset`."""
    if mode not in CLASS_SUBSETS:
        raise LabelSetError(f"--class-subset {mode!r} is not one of {', '.join(CLASS_SUBSETS)}")
    if mode == "none":
        return None, ""
    if mode == "present":
        labels = np.unique(ds.labels[ds.labels >= 0])
        mask = np.zeros(num_classes, bool)
        mask[labels[labels < num_classes]] = True
        return mask, f"logits restricted to the {int(mask.sum())} classes of the run's images (--class-subset present)"
    if label_set in SUBSET_FILES:
        if num_classes != 1000:
            raise LabelSetError(f"--data is {LABEL_SET_NAMES[label_set]}, a subset of ImageNet-1k's classes, but the "
                                f"model has {num_classes} outputs: give --class-subset none or a 1,000-class model")
        table = wnid_to_index()
        mask = np.zeros(num_classes, bool)
        mask[[table[w] for w in subset_wnids(label_set)]] = True
        return mask, "logits restricted to its 200 classes (--class-subset none: all 1,000)"
    return None, ""


def restrict(logits: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
    """`logits` with the outputs outside `mask` set to -inf (a copy), so top-k never picks them."""
    if mask is None:
        return logits
    if logits.shape[1] != mask.shape[0]:
        raise ValueError(f"{logits.shape[1]} logits per image for a class mask of {mask.shape[0]}")
    out = np.array(logits, dtype=np.float32 if logits.dtype == np.float16 else logits.dtype, copy=True)
    out[:, ~mask] = -np.inf
    return out


# -- --class-map ---------------------------------------------------------------------------------
def read_class_map(path: str, num_classes: int) -> Dict[str, int]:
    """`FOLDER CLASS` lines (CLASS: a model index, or an ImageNet wnid); `#` comments, blank lines skipped."""
    table = wnid_to_index()
    out: Dict[str, int] = {}
    for number, key, value in read_pairs(path, "--class-map", "FOLDER CLASS", LabelSetError):
        if value.isdigit():
            index = int(value)
        elif value in table:
            index = table[value]
        else:
            raise LabelSetError(f"--class-map {path}:{number}: {value!r} is neither a class index nor an ImageNet wnid")
        if index >= num_classes:
            raise LabelSetError(f"--class-map {path}:{number}: class {index} is outside the model's {num_classes}")
        if key in out and out[key] != index:
            raise LabelSetError(f"--class-map {path}:{number}: {key} is mapped twice ({out[key]} and {index})")
        out[key] = index
    if not out:
        raise LabelSetError(f"--class-map {path}: no 'FOLDER CLASS' lines")
    return out


def apply_class_map(ds: Dataset, path: str, num_classes: int) -> Dataset:
    """`ds` with each image's label taken from `--class-map`: by its class folder (ImageFolder
    layout), or by its label as written in the label file (flat layout)."""
    mapping = read_class_map(path, num_classes)
    if ds.layout == "folder":
        keys = [p.split(os.sep, 1)[0] for p in ds.paths]
    elif ds.layout == "flat":
        keys = [str(int(label)) for label in ds.labels]
    else:
        raise LabelSetError("--class-map needs labelled data (class folders, or a flat folder with --labels)")
    missing = sorted(set(k for k in keys if k not in mapping))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LabelSetError(f"--class-map {path} has no line for {len(missing)} class(es) of --data: {shown}")
    labels = np.fromiter((mapping[k] for k in keys), dtype=np.int64, count=len(keys))
    names = tuple(n for _, n in imagenet_classes()) if num_classes == 1000 else tuple(str(i) for i in range(num_classes))
    return replace(ds, labels=labels, class_names=names)


# -- ReaL ----------------------------------------------------------------------------------------
def val_ids(ds: Dataset) -> np.ndarray:
    """0-based ImageNet val ids of the images (`ILSVRC2012_val_00000001` is 0), from their file
    names; LabelSetError when an image has none."""
    ids = np.empty(len(ds), np.int64)
    lacking = []
    for i, p in enumerate(ds.paths):
        m = VAL_ID.search(os.path.basename(p))
        if m is None:
            lacking.append(p)
            ids[i] = -1
        else:
            ids[i] = int(m.group(1)) - 1
    if lacking:
        raise LabelSetError(
            f"--real-labels needs ImageNet val file names (ILSVRC2012_val_%08d.JPEG): {len(lacking)} image(s) of "
            f"--data have none, like {lacking[0]}; drop --real-labels for this data set")
    return ids


def load_real(path: str) -> List[List[int]]:
    """The ReaL label lists (real.json: a list of lists of class indices, in val-id order)."""
    if path == REAL_PACKAGED:
        path = REAL_JSON
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise LabelSetError(f"--real-labels {path}: cannot read ({e.strerror or e})")
    except ValueError as e:
        raise LabelSetError(f"--real-labels {path}: not JSON ({e}); expected real.json of "
                            "google-research/reassessed-imagenet")
    if not isinstance(data, list) or not all(isinstance(x, list) and all(isinstance(c, int) for c in x) for x in data):
        raise LabelSetError(f"--real-labels {path}: expected a list of lists of class indices (real.json)")
    return data


@dataclass
class RealCounter:
    """ReaL top-1/top-5 counted as the reassessed-imagenet work defines it: images whose list is
    empty are left out; a prediction is correct when it is in the image's list (top-5: when any
    of the five is)."""

    lists: List[List[int]]  # per dataset index: the ReaL classes (empty: left out)
    path: str
    images: int = 0
    correct: Dict[int, int] = field(default_factory=lambda: {1: 0, 5: 0})

    @classmethod
    def open(cls, path: str, ds: Dataset) -> "RealCounter":
        real = load_real(path)
        ids = val_ids(ds)
        beyond = ids[ids >= len(real)]
        if len(beyond):
            raise LabelSetError(f"--real-labels {path} has {len(real):,} entries, but --data has val id "
                                f"{int(beyond[0]) + 1} (ILSVRC2012_val_{int(beyond[0]) + 1:08d})")
        return cls([real[i] for i in ids], REAL_JSON if path == REAL_PACKAGED else path)

    def update(self, topk: np.ndarray, indices: np.ndarray) -> None:
        """`topk`: [n, >=5] best classes first; `indices`: the images' dataset indices."""
        for row, i in zip(topk.tolist(), indices.tolist()):
            good = self.lists[i]
            if not good:
                continue
            self.images += 1
            for k in self.correct:
                if any(c in good for c in row[:k]):
                    self.correct[k] += 1

    def report(self) -> Dict:
        from engine.report.stats import wilson

        n = self.images
        out = {"file": self.path, "images": n, "correct": self.correct[1], "correct_top5": self.correct[5],
               "accuracy": 100.0 * self.correct[1] / n if n else 0.0,
               "accuracy_top5": 100.0 * self.correct[5] / n if n else 0.0,
               "interval": wilson(self.correct[1], n)}
        return out


# -- published figures --------------------------------------------------------------------------
TIMM_DIR = os.path.join(DATA_DIR, "timm-results")


@functools.lru_cache(maxsize=None)
def _table(label_set: str) -> Tuple[Dict[str, str], ...]:
    with open(os.path.join(TIMM_DIR, TIMM_TABLES[label_set]), encoding="utf-8", newline="") as f:
        return tuple(csv.DictReader(f))


def published_for(model_name: str, label_set: str, img_size: Optional[int] = None) -> Optional[Dict]:
    """timm's published top-1/top-5 of `model_name` on `label_set`, or None.

    `model_name` is a timm tag (`resnet50.a1_in1k`); a torchvision model name stands for its
    V1 weights, which timm publishes as `NAME.tv_in1k`. A tag evaluated at several image sizes
    gives the row of `img_size` when there is one, else its first row."""
    if label_set not in TIMM_TABLES or not model_name:
        return None
    tags = [model_name] if "." in model_name else [f"{model_name}.tv_in1k"]
    rows = [r for r in _table(label_set) if r["model"] in tags]
    if not rows:
        return None
    chosen = next((r for r in rows if img_size is not None and r["img_size"] == str(img_size)), rows[0])
    return {"source": f"timm results/{TIMM_TABLES[label_set]}", "tag": chosen["model"],
            "img_size": int(chosen["img_size"]), "top1": float(chosen["top1"]), "top5": float(chosen["top5"]),
            "crop_pct": float(chosen["crop_pct"]), "interpolation": chosen["interpolation"]}

"""What an index of images is, shared by the folder layouts (dataset.py) and the containers
(containers/): the `Dataset`, its error, image names and label files. Imports nothing else of
the pipeline, so both can use it without an import circle."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from engine.classes import imagenet_classes
from engine.errors import UsageError

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LABEL_FILE_NAMES = ("val_label.txt",)
UNLABELLED = -1


class DatasetError(UsageError):
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


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def imagenet_names() -> Tuple[str, ...]:
    return tuple(name for _, name in imagenet_classes())


def read_pairs(path: str, flag: str, form: str, error=DatasetError) -> Iterator[Tuple[int, str, str]]:
    """(line number, first, last) of each `A B` line of a text file (`form` names the two, like
    'FILENAME INDEX'); blank lines and `#` comments are skipped. `error(message)` names the flag,
    the file and the line of what cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise error(f"{flag} {path}: cannot read ({e.strerror or e})")
    except UnicodeDecodeError:
        raise error(f"{flag} {path}: not a text file (expected lines '{form}')")
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(None, 1)
        if len(parts) != 2:
            raise error(f"{flag} {path}:{number}: expected '{form}', got {line!r}")
        yield number, parts[0], parts[1]


def read_label_file(path: str) -> List[Tuple[str, int]]:
    """Parse `FILENAME INDEX` lines; blank lines and `#` comments are skipped."""
    entries: List[Tuple[str, int]] = []
    for number, name, index in read_pairs(path, "--labels", "FILENAME INDEX"):
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


def few(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")

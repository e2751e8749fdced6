"""The ImageNet-1k class list shipped with the package (index, wnid, name)."""

from __future__ import annotations

import functools
import os
from typing import Dict, List, Tuple

_TSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "imagenet_classes.tsv")


@functools.lru_cache(maxsize=None)
def imagenet_classes() -> Tuple[Tuple[str, str], ...]:
    """(wnid, human name) for each of the 1000 ImageNet classes, in the standard index order."""
    rows: List[Tuple[str, str]] = []
    with open(_TSV, encoding="utf-8") as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            index, wnid, name = line.rstrip("\n").split("\t")
            if int(index) != len(rows):
                raise RuntimeError(f"{_TSV}: index {index} out of order")
            rows.append((wnid, name))
    return tuple(rows)


@functools.lru_cache(maxsize=None)
def wnid_to_index() -> Dict[str, int]:
    return {wnid: i for i, (wnid, _) in enumerate(imagenet_classes())}

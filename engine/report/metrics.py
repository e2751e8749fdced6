"""Exact top-k accuracy in integers: every image counted once, nothing averaged per batch.

Ranks break ties between equal logits by the lower class index (a stable descending sort),
so the counts do not depend on a top-k kernel's tie order.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np


def label_ranks(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each row's label among its logits (0: top-1)."""
    n, c = logits.shape
    if n == 0:
        return np.zeros(0, np.int64)
    if labels.min() < 0 or labels.max() >= c:
        bad = int(labels[(labels < 0) | (labels >= c)][0])
        raise ValueError(f"label {bad} is outside the model's {c} classes")
    own = logits[np.arange(n), labels][:, None]
    greater = (logits > own).sum(axis=1)
    tied_before = ((logits == own) & (np.arange(c)[None, :] < labels[:, None])).sum(axis=1)
    return (greater + tied_before).astype(np.int64)


def topk_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """The k best classes per row, best first, ties to the lower index (as `label_ranks`)."""
    n, c = logits.shape
    k = min(k, c)
    kth = np.partition(logits, c - k, axis=1)[:, c - k][:, None]  # k-th largest value per row
    greater = logits > kth
    tied = logits == kth
    need = k - greater.sum(axis=1, keepdims=True)
    chosen = greater | (tied & (np.cumsum(tied, axis=1) <= need))
    idx = np.nonzero(chosen)[1].reshape(n, k)  # ascending class index within each row
    vals = np.take_along_axis(logits, idx, axis=1)
    return np.take_along_axis(idx, np.argsort(-vals, axis=1, kind="stable"), axis=1)


class Metrics:
    """Integer top-1/top-5 counts overall and per class, plus the list of failed images."""

    def __init__(self, num_classes: int = 1000, topk: Sequence[int] = (1, 5)):
        self.num_classes = num_classes
        self.topk = tuple(topk)
        self.images = 0
        self.correct = {k: 0 for k in self.topk}
        self.class_images = np.zeros(num_classes, np.int64)
        self.class_correct = {k: np.zeros(num_classes, np.int64) for k in self.topk}
        self.failures: List[Tuple[int, str, str]] = []  # (dataset index, path, reason)

    def update(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Count a batch of scored images (no padding, no failed rows). Returns the label ranks."""
        labels = np.asarray(labels, np.int64)
        if logits.shape[0] != labels.shape[0]:
            raise ValueError(f"{logits.shape[0]} logit rows for {labels.shape[0]} labels")
        ranks = label_ranks(np.asarray(logits), labels)
        self.count_ranks(ranks, labels)
        return ranks

    def count_ranks(self, ranks: np.ndarray, labels: np.ndarray) -> None:
        """Count scored images by the 0-based rank of their label (from `label_ranks`, or its place
        in stored top-k rows: run-score --summarize)."""
        labels = np.asarray(labels, np.int64)
        self.images += len(labels)
        np.add.at(self.class_images, labels, 1)
        for k in self.topk:
            hit = ranks < k
            self.correct[k] += int(hit.sum())
            np.add.at(self.class_correct[k], labels[hit], 1)

    def fail(self, index: int, path: str, reason: str) -> None:
        self.failures.append((int(index), path, reason))

    @property
    def failed(self) -> int:
        return len(self.failures)

    def accuracy(self, k: int) -> float:
        """Percent of scored images whose label is in the top k (0 when nothing was scored)."""
        return 100.0 * self.correct[k] / self.images if self.images else 0.0

    def per_class(self, class_names: Sequence[str]) -> List[Dict]:
        rows = []
        for c in np.nonzero(self.class_images)[0]:
            n = int(self.class_images[c])
            row = {"index": int(c), "name": class_names[int(c)] if c < len(class_names) else str(c), "images": n}
            for k in self.topk:
                row[f"top{k}"] = 100.0 * int(self.class_correct[k][c]) / n
            rows.append(row)
        return rows

"""Labels for run-score's rows, and `run-score --summarize OUT`: accuracy from an output folder.

Rows carry the data set's label (`label`) when `--data` is a folder run-eval reads as labelled
(class folders, or a flat folder with its label file): the same index run-eval gives each image.
`--summarize OUT` reads every done part of the folder, whichever shards, machines, Slurm tasks or
Ray actors wrote them, and counts top-1/top-5 exactly as run-eval does (failed images apart; a
label found in the stored top-k at rank r counts for every k > r), under run-eval's JSON names.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from engine.errors import UsageError

LABEL_COLUMN = "label"


def manifest_labels(data: Optional[str], manifest) -> Optional[np.ndarray]:
    """int64 [len(manifest)]: each image's label by manifest id, as run-eval labels the same folder
    (-1 for an image it does not list); None where `data` is not a labelled folder."""
    from engine.pipeline.dataset import DatasetError, build_dataset

    if not data or not os.path.isdir(data):
        return None
    try:
        ds = build_dataset(data)
    except DatasetError:
        return None
    if ds.layout == "unlabelled":
        return None
    index = {p.replace(os.sep, "/"): int(label) for p, label in zip(ds.paths, ds.labels.tolist())}
    return np.fromiter((index.get(p, -1) for p in manifest.paths), dtype=np.int64, count=len(manifest.paths))


def read_part(path: str, fmt: str) -> Tuple[np.ndarray, List[Optional[List[int]]], List[Optional[str]],
                                             Optional[np.ndarray]]:
    """(ids, top-k index lists (None for a failed image), errors, labels or None) of one part file,
    read as compare-runs reads run-score parts (engine/report/perimage.py)."""
    from engine.report.perimage import read_part_columns

    cols = read_part_columns(path, fmt)
    ids = np.asarray([int(v) for v in cols.get("id", [])], np.int64)
    errors = [v if v not in (None, "") else None for v in cols.get("error", [])]
    labels = None
    if LABEL_COLUMN in cols:
        labels = np.asarray([-1 if v in (None, "") else int(v) for v in cols[LABEL_COLUMN]], np.int64)
    return ids, cols.get("topk_index", [None] * len(ids)), errors, labels


def _rank(topk_index: Optional[List[int]], label: int, past: int) -> int:
    """The label's 0-based place in a row's stored top-k, or `past` (beyond it) when absent."""
    if topk_index is None or label not in topk_index:
        return past
    return topk_index.index(label)


def summarize(out: str) -> Dict:
    """Exact counts over every done part of the output folder `out` (run-eval's JSON names)."""
    from engine.classes import imagenet_classes
    from engine.report.metrics import Metrics
    from engine.scoring.writer import OutputError, read_output_folder

    try:
        meta, manifest, folder = read_output_folder(out)
    except OutputError as e:
        raise UsageError(f"--summarize {e}") from None
    done = folder.done_records(range(folder.num_parts))
    num_classes = int(meta.get("num_classes") or 1000)
    topk = int(meta.get("topk") or 5)
    metrics = Metrics(num_classes)
    unlabelled = 0
    without_label = []
    for part in sorted(done):
        ids, idx, errors, labels = read_part(folder.part_path(part), folder.fmt)
        if labels is None:
            without_label.append(part)
            continue
        scored = [i for i, why in enumerate(errors) if why is None and labels[i] >= 0]
        unlabelled += sum(1 for i, why in enumerate(errors) if why is None and labels[i] < 0)
        for i, why in enumerate(errors):
            if why is not None:
                metrics.fail(int(ids[i]), manifest.paths[int(ids[i])], why)
        if scored:
            ranks = np.array([_rank(idx[i], int(labels[i]), topk) for i in scored], np.int64)
            metrics.count_ranks(ranks, labels[scored])
    if done and len(without_label) == len(done):
        raise UsageError(f"--summarize {out}: its rows have no label column (written before run-score stored "
                         f"labels, or --data was not a labelled folder): score it again into a new --out to count "
                         "accuracy")
    names = tuple(n for _, n in imagenet_classes()) if num_classes == 1000 else tuple(map(str, range(num_classes)))
    summary = {
        "out": os.path.abspath(out), "model": meta.get("model"), "parts_total": folder.num_parts,
        "parts_done": len(done), "parts_missing": folder.num_parts - len(done),
        "parts_without_label": without_label, "manifest_images": len(manifest),
        "images": metrics.images, "failed": metrics.failed, "unlabelled": unlabelled,
        "correct_top1": metrics.correct[1], "correct_top5": metrics.correct[5] if topk >= 5 else None,
        "top1": metrics.accuracy(1), "top5": metrics.accuracy(5) if topk >= 5 else None,
        "topk_stored": topk,
        "failures": [{"index": i, "path": p, "reason": r} for i, p, r in metrics.failures],
        "per_class": metrics.per_class(names),
    }
    return summary


def format_summary(s: Dict) -> str:
    top5 = "-" if s["top5"] is None else f"{s['top5']:.3f} %  ({s['correct_top5']:,} / {s['images']:,})"
    lines = [f"Summary of {s['out']}: {s['model']}",
             f"  parts         {s['parts_done']:,} of {s['parts_total']:,} done"
             + (f", {s['parts_missing']:,} missing: the figures cover the done parts only" if s["parts_missing"] else ""),
             f"  images        {s['images']:,} scored, {s['failed']:,} failed (of {s['manifest_images']:,} in the manifest)",
             f"  top-1         {s['top1']:.3f} %  ({s['correct_top1']:,} / {s['images']:,})",
             f"  top-5         {top5}" + ("" if s["top5"] is not None else
                                         f" (the rows keep the top {s['topk_stored']}: score with --topk 5 or more)")]
    if s["parts_without_label"]:
        lines.append(f"  no labels     parts {s['parts_without_label'][:10]} have no label column (written before "
                     "run-score stored labels): not counted")
    if s["unlabelled"]:
        lines.append(f"  unlabelled    {s['unlabelled']:,} scored images have no label: not counted")
    return "\n".join(lines)

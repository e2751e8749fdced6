"""`compare-runs A B`: two runs over the same images, compared image by image.

A and B are `run-eval --per-image` files or run-score output folders (or part files). Images are
matched by their path relative to the data set (and their size where both runs know it); runs
over different images are refused. Over the images scored in both: each run's top-1 and top-5
with Wilson intervals, B's top-1 minus A's with its paired interval, the images right in one run
only (each direction), McNemar's exact p-value, and the classes whose count moved most.

Labels come from the files (`label`), else from the class folder in the path (an ImageNet wnid,
or a class number as in ImageNet-V2), as run-eval numbers them.

Exit statuses: 0 compared; 2 bad arguments, unreadable files, or runs that are not over the same
images (the message says how they differ).
"""

from __future__ import annotations

import argparse
import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from engine.classes import imagenet_classes, wnid_to_index
from engine.errors import EXIT_OK, UsageError
from engine.report.perimage import Rows, read_rows
from engine.report.stats import binom_log_p_two_sided, format_interval, paired_difference, wilson

TOP_CLASSES = 10


class CompareError(UsageError):
    """The two runs cannot be compared; the message says why and what to do."""


def labels_from_paths(paths: Sequence[str]) -> np.ndarray:
    """The class of each path from its first folder (wnid or class number), -1 where none."""
    table = wnid_to_index()
    out = np.full(len(paths), -1, np.int64)
    for i, p in enumerate(paths):
        head = p.replace("\\", "/").split("/", 1)
        if len(head) < 2:
            continue
        d = head[0]
        if d in table:
            out[i] = table[d]
        elif d.isdigit() and (d == "0" or not d.startswith("0")):
            out[i] = int(d)
    return out


def _few(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _describe(r: Rows) -> Dict:
    m = r.meta or {}
    return {"source": r.source, "kind": r.kind, "model": m.get("model"), "weights": m.get("weights"),
            "preprocessing": m.get("preprocessing"), "label_set": m.get("label_set")}


def compare(a: Rows, b: Rows, top_classes: int = TOP_CLASSES) -> Dict:
    """The comparison report of two runs; CompareError when they are not over the same images."""
    for r, name in ((a, "A"), (b, "B")):
        if len(set(r.paths)) != len(r.paths):
            seen, dup = set(), []
            for p in r.paths:
                if p in seen:
                    dup.append(p)
                seen.add(p)
            raise CompareError(f"{name} ({r.source}) lists {len(dup)} path(s) twice, like {dup[0]}: "
                               "not one run's rows (were two runs' files concatenated?)")
    pos_b = {p: i for i, p in enumerate(b.paths)}
    only_a = [p for p in a.paths if p not in pos_b]
    pos_a = {p: i for i, p in enumerate(a.paths)}
    only_b = [p for p in b.paths if p not in pos_a]
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"{len(only_a):,} only in A ({_few(only_a)})")
        if only_b:
            parts.append(f"{len(only_b):,} only in B ({_few(only_b)})")
        raise CompareError(f"the runs are not over the same images: {'; '.join(parts)}; "
                           f"A has {len(a):,} images, B {len(b):,}. Compare runs of the same --data and --limit")
    ib = np.array([pos_b[p] for p in a.paths], np.int64)  # B's row of each of A's rows
    sa, sb = a.sizes, b.sizes[ib]
    differ = np.nonzero((sa >= 0) & (sb >= 0) & (sa != sb))[0]
    if len(differ):
        i = int(differ[0])
        raise CompareError(f"{len(differ):,} image(s) have the same path but a different size in A and B, like "
                           f"{a.paths[i]} ({int(sa[i]):,} and {int(sb[i]):,} bytes): not the same files")
    la, lb = a.labels.copy(), b.labels[ib].copy()
    from_path = labels_from_paths(a.paths)
    la[la < 0], lb[lb < 0] = from_path[la < 0], from_path[lb < 0]
    clash = np.nonzero((la >= 0) & (lb >= 0) & (la != lb))[0]
    if len(clash):
        i = int(clash[0])
        raise CompareError(f"{len(clash):,} image(s) have different labels in A and B, like {a.paths[i]} "
                           f"({int(la[i])} and {int(lb[i])}): the runs counted against different label sets "
                           "(--class-map, --labels)")
    labels = np.where(la >= 0, la, lb)
    ok_a = np.array([e is None for e in a.errors], bool)
    ok_b = np.array([b.errors[j] is None for j in ib], bool)
    both = ok_a & ok_b
    unlabelled = both & (labels < 0)
    if unlabelled.any():
        i = int(np.nonzero(unlabelled)[0][0])
        raise CompareError(f"{int(unlabelled.sum()):,} image(s) have no label in either run, like {a.paths[i]}: "
                           "compare run-eval --per-image files, or run-score outputs of class folders")
    n = int(both.sum())
    if n == 0:
        raise CompareError("no image was scored in both runs: nothing to compare")
    lab = labels[both]
    t5a, t5b = a.top5[both], b.top5[ib][both]
    ca, cb = t5a[:, 0] == lab, t5b[:, 0] == lab
    c5a, c5b = (t5a == lab[:, None]).any(axis=1), (t5b == lab[:, None]).any(axis=1)
    b_only, a_only = ~ca & cb, ca & ~cb
    nb, na = int(b_only.sum()), int(a_only.sum())
    log_p = binom_log_p_two_sided(nb, nb + na)
    agree = int((t5a[:, 0] == t5b[:, 0]).sum())
    paths = np.array(a.paths, dtype=object)[both]

    def run(r: Rows, c1: np.ndarray, c5: np.ndarray) -> Dict:
        k1, k5 = int(c1.sum()), int(c5.sum())
        return dict(_describe(r), images=n, correct_top1=k1, correct_top5=k5, top1=100.0 * k1 / n,
                    top5=100.0 * k5 / n, interval_top1=wilson(k1, n), interval_top5=wilson(k5, n))

    classes = np.unique(lab)
    per_a = np.bincount(lab, weights=ca, minlength=int(lab.max()) + 1)
    per_b = np.bincount(lab, weights=cb, minlength=int(lab.max()) + 1)
    count = np.bincount(lab, minlength=int(lab.max()) + 1)
    moved = sorted(((int(per_b[c] - per_a[c]), int(c)) for c in classes if per_b[c] != per_a[c]),
                   key=lambda t: (-abs(t[0]), t[1]))[:top_classes]
    names = [nm for _, nm in imagenet_classes()]
    return {
        "images": n,
        "images_listed": len(a),
        "failed_a": int((~ok_a).sum()), "failed_b": int((~ok_b).sum()),
        "left_out": int(len(a) - n),
        "a": run(a, ca, c5a), "b": run(b, cb, c5b),
        "difference_top1": paired_difference(nb, na, n),  # B - A, points
        "difference_top5": paired_difference(int((~c5a & c5b).sum()), int((c5a & ~c5b).sum()), n),
        "right_in_b_only": nb, "right_in_a_only": na,
        # the same top-1 in both runs, right or wrong: meaningful even where the labels are not
        "top1_agreement": {"images": int(agree), "percent": 100.0 * agree / n},
        "mcnemar": {"test": "McNemar exact (two-sided binomial on the discordant images)",
                    "p_value": math.exp(log_p), "log10_p_value": log_p / math.log(10.0)},
        "changed": {"right_in_b_only": sorted(paths[b_only].tolist()),
                    "right_in_a_only": sorted(paths[a_only].tolist())},
        "classes_moved": [{"index": c, "name": names[c] if c < len(names) else str(c), "images": int(count[c]),
                           "correct_a": int(per_a[c]), "correct_b": int(per_b[c]), "change": d}
                          for d, c in moved],
    }


def _p_text(m: Dict) -> str:
    p, lg = m["p_value"], m["log10_p_value"]
    if p >= 1e-4:
        return f"{p:.4f}"
    if p > 0:
        return f"{p:.2e}"
    return f"1e{lg:.0f} (log10 p = {lg:.1f})"


def format_compare(rep: Dict) -> str:
    lines = [f"Comparison of two runs on the same {rep['images_listed']:,} images"
             + (f" ({rep['left_out']:,} failed in A or B, left out: {rep['images']:,} paired)" if rep["left_out"] else "")]
    for key in ("a", "b"):
        r = rep[key]
        who = r.get("model") or "?"
        pre = r.get("preprocessing") or {}
        if pre:
            resize = pre.get("resize")
            resize = "x".join(str(v) for v in resize) if isinstance(resize, (list, tuple)) else resize
            who += f", resize {resize} crop {pre.get('crop')} {pre.get('interpolation')}, mean {pre.get('mean')}"
        lines.append(f"  {key.upper()}  {r['source']} ({r['kind']}: {who})")
        lines.append(f"     top-1 {r['top1']:.3f} % {format_interval(r['interval_top1'])}  ({r['correct_top1']:,} / "
                     f"{r['images']:,})   top-5 {r['top5']:.3f} % {format_interval(r['interval_top5'])}")
    d = rep["difference_top1"]
    iv = d["interval"]
    lines.append(f"  B - A        top-1 {d['points']:+.3f} points [{iv[0]:+.2f}, {iv[1]:+.2f}] (paired, 95 %); "
                 f"top-5 {rep['difference_top5']['points']:+.3f}")
    lines.append(f"  changed      {rep['right_in_b_only']:,} images right in B only, {rep['right_in_a_only']:,} right in "
                 f"A only; McNemar exact p = {_p_text(rep['mcnemar'])}")
    ag = rep["top1_agreement"]
    lines.append(f"  agreement    the same top-1 in both on {ag['percent']:.3f} % of the images ({ag['images']:,})")
    if rep["classes_moved"]:
        shown = ", ".join(f"{c['name']} {c['change']:+d}/{c['images']}" for c in rep["classes_moved"][:5])
        lines.append(f"  classes      moved most (B - A, of images): {shown}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compare-runs", allow_abbrev=False,
        description="Compare two runs over the same images, image by image: top-1 of each with intervals, the "
                    "paired difference, the images that changed, McNemar's exact test, the classes that moved.")
    p.add_argument("a", metavar="A", help="run-eval --per-image file (.parquet, .csv) or run-score --out folder")
    p.add_argument("b", metavar="B", help="the other run, over the same images")
    p.add_argument("--json", metavar="PATH", help="write the full comparison (with every changed image's path)")
    p.add_argument("--top-classes", type=int, default=TOP_CLASSES, metavar="N",
                   help="classes listed in the JSON's classes_moved (default: %(default)s)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from engine.commands import main as command_main

    return command_main("compare-runs", _compare_command, argv)


def _compare_command(argv: Optional[List[str]]) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.top_classes < 0:
        p.error(f"--top-classes must not be negative, got {a.top_classes}")
    try:
        ra, rb = read_rows(a.a), read_rows(a.b)
    except OSError as e:  # a file that cannot be read is a bad argument here, not a failed run
        raise CompareError(f"cannot read {e.filename or 'a run'}: {e.strerror or e}") from None
    rep = compare(ra, rb, a.top_classes)
    print(format_compare(rep))
    if a.json:
        from engine.report.output import write_json

        write_json(a.json, rep)
    return EXIT_OK

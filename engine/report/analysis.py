"""What run-eval counts beside top-1/top-5: the label set (class subset, class map, ReaL), the
statistics (intervals, NLL, ECE, confusions) and the per-image rows; all updated in the reduce
step from each batch's logits, over the scored images only.

run-eval's hooks (engine/evaluate.py):

    ds, analysis = Analysis.open(cfg, ds)                    # after build_dataset
    logits = analysis.restrict(logits)                       # reduce: before Metrics.update
    analysis.update(logits, labels, indices)                 # reduce: after it
    analysis.fail(index, reason)                             # reduce: each failed image
    report.update(analysis.report(metrics, cfg))             # build_report
    analysis.write_per_image(cfg, report)                    # after the report (--per-image)
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from engine.pipeline.dataset import Dataset
from engine.report import labelsets
from engine.report.stats import RunStats, format_interval, logsumexp_rows, top5


class Analysis:
    def __init__(self, ds: Dataset, num_classes: int, label_set: str, mask: Optional[np.ndarray], mask_note: str,
                 class_subset: str, real: Optional[labelsets.RealCounter], per_image: bool):
        self.ds, self.num_classes = ds, num_classes
        self.label_set, self.mask, self.mask_note, self.class_subset = label_set, mask, mask_note, class_subset
        self.real = real
        self.stats = RunStats(num_classes)
        from engine.report.perimage import PerImageRows

        self.rows = PerImageRows(ds.paths, ds.root) if per_image else None

    @classmethod
    def open(cls, cfg, ds: Dataset) -> Tuple[Dataset, "Analysis"]:
        """The run's label set from `cfg` (class_subset, class_map, real_labels, per_image) and
        the data set; returns the data set relabelled by `--class-map` (else `ds`) and the analysis.
        Raises DatasetError subclasses (exit status 2) for options that do not fit the data."""
        opts, num_classes = cfg.report, cfg.data.num_classes
        class_map, subset = opts.class_map, opts.class_subset
        if opts.per_image:
            from engine.report.perimage import PerImageError, format_of

            try:
                format_of(opts.per_image)
            except PerImageError as e:
                raise labelsets.LabelSetError(str(e)) from None
        if class_map:
            ds = labelsets.apply_class_map(ds, class_map, num_classes)
        label_set = labelsets.detect(ds, class_map)
        mask, note = labelsets.class_mask(subset, label_set, ds, num_classes)
        real = labelsets.RealCounter.open(opts.real_labels, ds) if opts.real_labels else None
        return ds, cls(ds, num_classes, label_set, mask, note, subset, real, bool(opts.per_image))

    def restrict(self, logits: np.ndarray) -> np.ndarray:
        return labelsets.restrict(logits, self.mask)

    def update(self, logits: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
        """A batch of scored images: `logits` as counted (after `restrict`)."""
        if len(labels) == 0:
            return
        labels = np.asarray(labels, np.int64)
        lse = logsumexp_rows(logits)
        if self.real is None and self.rows is None:
            top1 = np.argmax(logits, axis=1)  # the first of equal maxima: the counts' tie rule
            self.stats.update(logits, labels, top1, lse)
            return
        topk = top5(logits)
        self.stats.update(logits, labels, topk[:, 0], lse)
        if self.real is not None:
            self.real.update(topk, indices)
        if self.rows is not None:
            picked = np.take_along_axis(np.asarray(logits, np.float64), topk, axis=1)
            prob = np.exp(picked - lse[:, None]).astype(np.float32)
            self.rows.update(np.asarray(indices), labels, topk, prob)

    def fail(self, index: int, reason: str) -> None:
        if self.rows is not None:
            self.rows.fail(index, reason)

    def report(self, metrics, cfg) -> Dict:
        """The report's keys: `statistics`, `label_set` (with `published`: timm's figure for this label
        set and for ReaL, where its tables have the model), `real` (with --real-labels). The report's
        top-level `published` is the ImageNet-1k figure the weights declare (engine/models/provenance.py)."""
        out: Dict = {"statistics": self.stats.report(metrics.correct, metrics.images, self.ds.class_names)}
        label_set: Dict = {"name": self.label_set, "description": labelsets.LABEL_SET_NAMES.get(self.label_set, ""),
                     "class_subset": self.class_subset,
                     "restricted_to": int(self.mask.sum()) if self.mask is not None else None,
                     "note": self.mask_note or None}
        if cfg.report.class_map:
            label_set["class_map"] = cfg.report.class_map
        out["label_set"] = label_set
        model = cfg.model.name if not cfg.model.ts else None
        published = {}
        if model:
            for name in ([self.label_set] if self.label_set in labelsets.TIMM_TABLES else []) + \
                    (["real"] if self.real is not None else []):
                fig = labelsets.published_for(model, name, cfg.preprocess.crop)
                if fig is not None:
                    published[name] = fig
        label_set["published"] = published
        if self.real is not None:
            out["real"] = self.real.report()
        return out

    def write_per_image(self, cfg, report: Dict) -> Optional[int]:
        if self.rows is None:
            return None
        meta = {"model": report.get("model"), "weights": (report.get("backend") or {}).get("weights"),
                "preprocessing": report["config"]["preprocess"], "label_set": self.label_set,
                "class_subset": self.class_subset, "data": self.ds.root, "engine_version": report.get("version"),
                "partial": report.get("partial", False)}
        return self.rows.write(cfg.report.per_image, meta)


def format_analysis(report: Dict) -> List[str]:
    """The console lines: one of statistics, one of the label set where it says something."""
    st = report.get("statistics")
    if not st:
        return []
    nll = st.get("nll")
    nll_text = f"{nll:.4f}" if nll is not None else ("inf" if st.get("nll_infinite_images") else "-")
    lines = [f"  95 % interval top-1 {format_interval(st['interval_top1'])}  top-5 {format_interval(st['interval_top5'])}"
             f" (Wilson); NLL {nll_text}, ECE {st['ece']:.2f} % ({st['ece_bins']} bins)"]
    parts = []
    ls = report.get("label_set") or {}
    if ls.get("name") not in (None, "imagenet", "other") or ls.get("note"):
        parts.append((ls.get("description") or ls["name"]) + (f": {ls['note']}" if ls.get("note") else ""))
    real = report.get("real")
    if real:
        parts.append(f"ReaL top-1 {real['accuracy']:.3f} % ({real['correct']:,} / {real['images']:,} with ReaL labels)"
                     f" top-5 {real['accuracy_top5']:.3f} %")
    for name, fig in ((report.get("label_set") or {}).get("published") or {}).items() if parts else ():
        parts.append(f"published ({fig['tag']} @{fig['img_size']}, {name}) {fig['top1']:.3f} / {fig['top5']:.3f}")
    if parts:
        lines.append("  label set     " + "; ".join(parts))
    return lines

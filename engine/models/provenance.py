"""What a report says about the preprocessing: where each field came from, how it differs from
what the weights declare, and the published figures beside the measured ones.

Precedence, highest first: a flag (--resize, --crop, --interpolation, --mean, --std), --preset
NAME, the spec stored in a --ts file, the weights' declaration (torchvision's weights enum,
timm's pretrained_cfg). A field is credited to the highest source whose value it has.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from engine.spec import PreprocessSpec, describe_resize

FIELDS = tuple(f.name for f in dataclasses.fields(PreprocessSpec) if f.name != "decode")


def _show(field_name: str, value) -> str:
    if field_name == "resize":
        return describe_resize(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + ")"
    return str(value)


def _entry(model: str, weights: Optional[str] = None, ts: Optional[str] = None, timm_size: str = "test"):
    from engine.models.catalog import resolve

    return resolve(model, weights, ts, timm_size)


def preprocess_differences(spec: PreprocessSpec, model: str, weights: Optional[str] = None, ts: Optional[str] = None,
                           timm_size: str = "test") -> List[Dict[str, str]]:
    """How `spec` differs from what `model`'s weights declare (torchvision's ImageNet default for a
    name no library declares): one entry per field, both values in words. Decode mode left out."""
    correct = _entry(model, weights, ts, timm_size).spec
    out = []
    for name in FIELDS:
        used, right = getattr(spec, name), getattr(correct, name)
        if used != right:
            out.append({"field": name, "used": _show(name, used), "correct": _show(name, right)})
    return out


def preprocessing_check(model: str, spec: PreprocessSpec, named=None, weights: Optional[str] = None,
                        ts: Optional[str] = None, timm_size: str = "test") -> Dict:
    """`sources`: per field, what set it ("flag", "preset NAME", "file" or "weights", "assumed");
    `declared_by`: the declaration in words; `published`: {"top1", "top5", "source"} or None;
    `differences` from the declaration; with --preset (`named`, an engine.config.NamedPreset), that
    script's origin and figures."""
    preset = named.name if named is not None else None
    entry = _entry(model, weights, ts, timm_size)
    kind = {"file": "file", "torchvision": "weights", "timm": "weights"}.get(entry.family, "assumed")
    if not entry.declared:
        kind = "assumed"
    base = named.spec if named is not None else entry.spec
    sources = {}
    for name in FIELDS:
        if getattr(spec, name) != getattr(base, name):
            sources[name] = "flag"
        else:
            sources[name] = f"preset {preset}" if preset is not None else kind
    out: Dict = {
        "model_has_preset": entry.declared,  # the weights (or the file) declare the preprocessing
        "declared_by": entry.source,
        "declared": {"family": entry.family, "model": entry.model, "tag": entry.tag},
        "sources": sources,
        "published": entry.published,
        "differences": preprocess_differences(spec, model, weights, ts, timm_size),
    }
    if named is not None:
        pub = entry.published
        out.update(preset=preset, source=named.source, notes=list(named.notes),
                   script_figure=named.figures.get(entry.model if entry.family != "file" else model),
                   published_figure=(pub["top1"], pub["top5"]) if pub else None,
                   preset_overridden=[n for n in FIELDS if getattr(spec, n) != getattr(named.spec, n)])
    return out


def _whose(check: Dict) -> str:
    d = check.get("declared") or {}
    if d.get("family") == "timm":
        return f"timm's published figure for {d.get('model')}"
    tag = d.get("tag")
    what = "its V1 weights" if tag == "IMAGENET1K_V1" else f"its {tag} weights" if tag else "its weights"
    return f"torchvision's published figure for {what}"


def format_sources(check: Dict) -> List[str]:
    """One line saying where the preprocessing came from; one more naming the fields flags set."""
    if "sources" not in check:
        return []
    lines = [f"  preprocessing from {check['declared_by']}"]
    flags = [n for n, s in check["sources"].items() if s == "flag"]
    if flags and "preset" not in check:
        lines.append(f"                overridden by flags: {', '.join(flags)}")
    return lines


def format_published(check: Dict, top1: Optional[float] = None, top5: Optional[float] = None) -> List[str]:
    pub = check.get("published")
    if not pub or "preset" in check:
        return []
    top5_text = f" / {pub['top5']:.3f}" if pub.get("top5") is not None else ""
    measured = f"; measured here {top1:.3f} / {top5:.3f}" if top1 is not None and top5 is not None else ""
    same = "" if not check.get("differences") else " (with its declared preprocessing, which this run changed)"
    return [f"  published     {pub['top1']:.3f}{top5_text} (top-1 / top-5 %) from {pub['source']}{same}{measured}"]


def format_preprocessing_check(check: Dict, model: str, top1: Optional[float] = None,
                               top5: Optional[float] = None) -> List[str]:
    """The report's lines: the source of the preprocessing, the published figures; with a --preset,
    how it differs from the model's declared preprocessing."""
    lines = format_sources(check) + format_published(check, top1, top5)
    if "preset" not in check:
        return lines
    lines.append(f"  preset        {check['preset']}: the preprocessing of {check['source']}")
    if check["preset_overridden"]:
        lines.append(f"                overridden by flags: {', '.join(check['preset_overridden'])}")
    if check["differences"]:
        whose = f"{model}'s weights were evaluated with" if check["model_has_preset"] else \
            "torchvision's ImageNet default"
        lines.append(f"  differs from  what {whose}:")
        for d in check["differences"]:
            lines.append(f"    {d['field']:<14}{d['used']}  (correct: {d['correct']})")
    else:
        lines.append(f"                the same as {model}'s own preprocessing")
    script, published = check.get("script_figure"), check.get("published_figure")
    if script or published:
        parts = []
        if script:
            parts.append(f"that script's figure {script[0]:.3f} / {script[1]:.3f}")
        if published:
            parts.append(f"{_whose(check)} with the correct preprocessing {published[0]:.3f} / {published[1]:.3f}")
        lines.append(f"  {model}: " + "; ".join(parts) + " (top-1 / top-5 %)")
    lines.append("  correct run   the same command without --preset (the model's preprocessing); "
                 "docs/modelzoo-reference.md explains the gap")
    for note in check["notes"]:
        lines.append(f"  note          {note}")
    return lines

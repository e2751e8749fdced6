"""Where a model's preprocessing comes from: what its weights declare, never a table of ours.

    --model NAME [--weights TAG|FILE|TAG=FILE]   torchvision: the weights enum's transforms()
                                                 (resize, crop, interpolation, mean, std) and
                                                 meta["_metrics"]["ImageNet-1K"] (published acc@1/5)
    --model timm:ARCH.TAG (or timm/ARCH.TAG)     timm: the tag's pretrained_cfg, resolved the way
                                                 timm's validate.py does (resolve_data_config with
                                                 use_test_size), published figures from timm's
                                                 results tables (engine/data/timm-results)
    --ts FILE                                    the spec `export` stored inside the file
                                                 (imagenet_engine.json among its extra files)

:func:`resolve` gives one :class:`ModelEntry`: the spec, where each field came from (`source`),
the published figures, and the weights tag. `engine.config.resolve_config` starts from it; flags
and `--preset` override it there (precedence: flags > --preset > the file's own spec > the
weights' declaration). Nothing here imports torch at module level; torchvision and timm are
imported when a model of theirs is resolved.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

from engine.spec import IMAGENET_MEAN, IMAGENET_STD, ConfigError, PreprocessSpec

TIMM_PREFIXES = ("timm:", "timm/")
#: the extra file `export` writes into a TorchScript archive (torch.jit.save(_extra_files=...))
EXTRA_FILE = "imagenet_engine.json"
EXTRA_FORMAT = 1
TIMM_SIZES = ("test", "train")
_TAG_RE = re.compile(r"^(DEFAULT|[A-Z][A-Z0-9]*(_[A-Z0-9]+)+)$")
_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "timm-results")
#: timm's results tables (engine/data/timm-results/results-<key>.csv), in the order they are shown
TIMM_RESULTS = (("imagenet", "ImageNet-1k val"), ("imagenet-real", "ReaL"),
                ("imagenetv2-matched-frequency", "ImageNet-V2"), ("imagenet-a", "ImageNet-A"),
                ("imagenet-r", "ImageNet-R"), ("sketch", "ImageNet-Sketch"))


@dataclass(frozen=True)
class ModelEntry:
    """One model with its weights: the preprocessing they declare and where it was read.

    family: "torchvision", "timm", or "unknown" (a name no library declares: torchvision's
    ImageNet default is assumed, and `declared` is False). `source` names what declared the spec
    in words, `published` is {"top1", "top5", "source"} (None when nothing is published)."""

    family: str
    model: str
    tag: Optional[str]
    spec: PreprocessSpec
    source: str
    declared: bool = True
    published: Optional[Dict] = None
    url: Optional[str] = None
    extra: Dict = field(default_factory=dict)

    def describe(self) -> str:
        s = self.spec
        resize = s.resize if isinstance(s.resize, int) else f"{s.resize[0]}x{s.resize[1]}"
        top1 = f"  published top-1 {self.published['top1']:.3f}" if self.published else ""
        mean = ",".join(f"{v:g}" for v in s.mean)
        std = ",".join(f"{v:g}" for v in s.std)
        return f"resize {resize} crop {s.crop} {s.interpolation} mean {mean} std {std}{top1}"


def is_timm(model: str) -> bool:
    return model.startswith(TIMM_PREFIXES)


def timm_name(model: str) -> str:
    """`timm:arch.tag` / `timm/arch.tag` -> `arch.tag`."""
    for p in TIMM_PREFIXES:
        if model.startswith(p):
            return model[len(p):]
    return model


def _triple(values) -> Tuple[float, float, float]:
    """A declared mean or std as three floats (PreprocessSpec refuses any other length)."""
    v = [float(x) for x in values]
    if len(v) != 3:
        raise ConfigError(f"the weights declare a mean or std of {len(v)} values; the engine needs three (RGB)")
    return v[0], v[1], v[2]


def is_tag(text: Optional[str]) -> bool:
    """A weights tag (IMAGENET1K_V2, DEFAULT, ...) rather than a file name."""
    return text is not None and bool(_TAG_RE.match(text)) and not os.path.exists(text)


def split_weights(weights: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """`--weights` -> (tag, file): "IMAGENET1K_V2" -> (tag, None); "F.pth" -> (None, F.pth);
    "IMAGENET1K_V2=F.pth" -> both (a state dict that keeps that tag's preprocessing)."""
    if not weights:
        return None, None
    if "=" in weights and not os.path.exists(weights):
        tag, path = weights.split("=", 1)
        if _TAG_RE.match(tag):
            return tag, path
    if is_tag(weights):
        return weights, None
    return None, weights


# ---- torchvision --------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _torchvision_names() -> Tuple[str, ...]:
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def torchvision_models() -> List[str]:
    """torchvision's classification models (`list_models(module=torchvision.models)`)."""
    return list(_torchvision_names())


def _torchvision_enum(model: str):
    """The weights enum of a torchvision classification model, or None for a name it does not list."""
    from torchvision.models import get_model_weights

    if model not in _torchvision_names():
        return None
    try:
        return get_model_weights(model)
    except (ValueError, KeyError):
        return None


def default_tag(enum) -> str:
    """The tag used without --weights: IMAGENET1K_V1 (the reference's weights, today's figures and
    cache keys) where the model has it, else the enum's DEFAULT (models with no V1, like vit_h_14)."""
    names = [w.name for w in enum]
    return "IMAGENET1K_V1" if "IMAGENET1K_V1" in names else enum.DEFAULT.name


_INTERPOLATION_NAMES = {"nearest": "nearest", "nearest-exact": "nearest", "bilinear": "bilinear",
                        "bicubic": "bicubic", "box": "box", "hamming": "hamming", "lanczos": "lanczos"}


def spec_from_image_classification(t) -> PreprocessSpec:
    """torchvision's ImageClassification preset (weights.transforms()) as a spec: the fields it has
    on torchvision 0.15 and on 0.29 (crop_size and resize_size as one-element lists)."""
    interp = getattr(t.interpolation, "value", str(t.interpolation)).lower()
    if interp not in _INTERPOLATION_NAMES:
        raise ConfigError(f"torchvision's transforms use interpolation {interp!r}, which the engine does not have")
    resize, crop = list(t.resize_size), list(t.crop_size)
    return PreprocessSpec(resize=resize[0] if len(resize) == 1 else (resize[0], resize[1]), crop=int(crop[0]),
                          interpolation=_INTERPOLATION_NAMES[interp], mean=_triple(t.mean), std=_triple(t.std))


def torchvision_entry(model: str, tag: Optional[str] = None) -> ModelEntry:
    """`model`'s weights `tag` (default: :func:`default_tag`): its transforms and published figures.
    A name torchvision does not list: its ImageNet default, marked as assumed."""
    enum = _torchvision_enum(model)
    if enum is None:
        if tag is not None:
            raise ConfigError(f"--weights {tag}: --model {model} is not a torchvision classification model with "
                              "weights tags (run-eval --list-models lists them)")
        return ModelEntry("unknown", model, None, PreprocessSpec(), declared=False,
                          source=f"torchvision's ImageNet default (no weights declare {model}'s preprocessing)")
    names = [w.name for w in enum]
    if tag is None:
        tag = default_tag(enum)
    if tag not in names and tag != "DEFAULT":
        raise ConfigError(f"--weights {tag}: {model} has no such weights tag (its tags: {', '.join(names)}, DEFAULT)")
    w = enum[tag] if tag != "DEFAULT" else enum.DEFAULT
    spec = spec_from_image_classification(w.transforms())
    metrics = w.meta.get("_metrics", {}).get("ImageNet-1K", {})
    published = None
    if "acc@1" in metrics:
        published = {"top1": float(metrics["acc@1"]), "top5": float(metrics["acc@5"]) if "acc@5" in metrics else None,
                     "source": f"torchvision {enum.__name__}.{w.name}.meta['_metrics']['ImageNet-1K']"}
    return ModelEntry("torchvision", model, w.name, spec, source=f"torchvision {enum.__name__}.{w.name}.transforms()",
                      published=published, url=w.url,
                      extra={"num_classes": len(w.meta.get("categories") or []) or None, "recipe": w.meta.get("recipe")})


def tag_for_file(model: str, path: str) -> Optional[str]:
    """The tag whose download has this file name (resnext50_32x4d-1a0047aa.pth is IMAGENET1K_V2)."""
    enum = _torchvision_enum(model)
    if enum is None:
        return None
    base = os.path.basename(path)
    for w in enum:
        if os.path.basename(w.url) == base:
            return w.name
    return None


# ---- timm ---------------------------------------------------------------------------------------

def import_timm():
    try:
        import timm  # noqa: F401
        import timm.data  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--model timm:...: timm is not installed ({e}); pip install imagenet-engine[timm]") from None
    return timm


def timm_pretrained_cfg(name: str) -> Tuple[str, Dict]:
    """(arch.tag, pretrained_cfg as a dict) of a timm name; a name without a tag gets timm's
    default tag for the architecture, as timm.create_model does."""
    timm = import_timm()
    from timm.models import get_pretrained_cfg, is_model

    arch, _, tag = name.partition(".")
    if not is_model(arch):
        raise ConfigError(f"--model timm:{name}: timm has no architecture {arch!r} "
                          "(run-eval --list-models 'timm:PATTERN' lists its pretrained tags)")
    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=False)  # no tag: timm's default tag of arch
    except RuntimeError:
        cfg = None
    if cfg is None or not cfg.tag:
        known = list(timm.list_pretrained(arch + ".*"))[:8]
        what = f"no pretrained tag {tag!r}" if tag else "no pretrained weights"
        raise ConfigError(f"--model timm:{name}: timm has {what} for {arch} (its tags: {', '.join(known) or 'none'})")
    name = f"{arch}.{cfg.tag}"
    return name, cfg.to_dict()


def timm_data_config(pretrained_cfg: Dict, size: str = "test") -> Dict:
    """timm's own resolution (validate.py: resolve_data_config(model=m, use_test_size=True))."""
    import_timm()
    from timm.data import resolve_data_config

    return resolve_data_config(pretrained_cfg=pretrained_cfg, use_test_size=(size == "test"))


def spec_from_timm_data_config(dc: Dict, name: str = "") -> PreprocessSpec:
    """timm's transforms_imagenet_eval as a spec: resize floor(size / crop_pct) (the shorter side for
    crop_mode center, both sides for squash), then a centre crop of size; `border` is refused."""
    _, h, w = dc["input_size"]
    if h != w:
        raise ConfigError(f"timm:{name} declares a non-square input {h}x{w}; the engine crops squares "
                          "(use another tag, or export the model with a square size)")
    mode = dc.get("crop_mode") or "center"
    crop_pct = dc.get("crop_pct") or 0.875
    scale = math.floor(h / crop_pct)
    interp = dc.get("interpolation") or "bilinear"
    if interp not in _INTERPOLATION_NAMES:
        raise ConfigError(f"timm:{name} declares interpolation {interp!r}, which the engine does not have")
    if mode == "center":
        resize = scale
    elif mode == "squash":
        resize = (scale, scale)
    else:
        raise ConfigError(f"timm:{name} declares crop_mode {mode!r} (resize the longer side, then pad), which the "
                          "engine does not do; give --resize and --crop to choose a preprocessing yourself")
    return PreprocessSpec(resize=resize, crop=int(h), interpolation=_INTERPOLATION_NAMES[interp],
                          mean=_triple(dc["mean"]), std=_triple(dc["std"]))


@lru_cache(maxsize=None)
def _timm_results(key: str) -> Dict[Tuple[str, int], Tuple[float, float]]:
    """(model, img_size) -> (top1, top5) from timm's results-<key>.csv (shipped in the package)."""
    out: Dict[Tuple[str, int], Tuple[float, float]] = {}
    path = os.path.join(_DATA, f"results-{key}.csv")
    if not os.path.isfile(path):
        return out
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                out.setdefault((row["model"], int(row["img_size"])), (float(row["top1"]), float(row["top5"])))
            except (KeyError, ValueError):
                continue
    return out


def timm_published(name: str, size: int) -> Optional[Dict]:
    """timm's published figures for `name` at input `size`: ImageNet-1k val as top1/top5, the
    other tables under `others`; None when timm's results do not list it at that size."""
    rows = _timm_results("imagenet")
    if (name, size) not in rows:
        return None
    top1, top5 = rows[(name, size)]
    others = {}
    for key, label in TIMM_RESULTS[1:]:
        r = _timm_results(key).get((name, size))
        if r:
            others[label] = {"top1": r[0], "top5": r[1]}
    return {"top1": top1, "top5": top5, "source": f"timm results-imagenet.csv ({name}, img_size {size})",
            "others": others}


def timm_entry(model: str, size: str = "test") -> ModelEntry:
    if size not in TIMM_SIZES:
        raise ConfigError(f"--timm-input-size {size!r} is not one of {', '.join(TIMM_SIZES)}")
    name, cfg = timm_pretrained_cfg(timm_name(model))
    dc = timm_data_config(cfg, size)
    spec = spec_from_timm_data_config(dc, name)
    which = "use_test_size=True" if size == "test" else "use_test_size=False (the train size)"
    return ModelEntry("timm", "timm:" + name, name.partition(".")[2], spec,
                      source=f"timm {name} pretrained_cfg via resolve_data_config({which})",
                      published=timm_published(name, int(dc["input_size"][1])),
                      url=cfg.get("url") or None,
                      extra={"hf_hub_id": cfg.get("hf_hub_id"), "num_classes": cfg.get("num_classes"),
                             "crop_pct": dc.get("crop_pct"), "crop_mode": dc.get("crop_mode"),
                             "input_size": list(dc["input_size"])})


# ---- exported files -----------------------------------------------------------------------------

def spec_to_json(entry: ModelEntry, spec: PreprocessSpec) -> Dict:
    """What `export` stores in a TorchScript file: the spec the model was exported for and what it is."""
    return {"format": EXTRA_FORMAT, "model": entry.model, "family": entry.family, "tag": entry.tag,
            "source": entry.source, "published": entry.published,
            "preprocess": {"resize": spec.resize if isinstance(spec.resize, int) else list(spec.resize),
                           "crop": spec.crop, "interpolation": spec.interpolation, "mean": list(spec.mean),
                           "std": list(spec.std)}}


def read_file_spec(path: str) -> Optional[Dict]:
    """The stored spec of a TorchScript file (a zip archive: `<name>/extra/imagenet_engine.json`), read
    without torch; None for a file without one (or not a zip archive)."""
    try:
        with zipfile.ZipFile(path) as z:
            for n in z.namelist():
                if n.endswith("/extra/" + EXTRA_FILE):
                    data = json.loads(z.read(n).decode("utf-8"))
                    return data if isinstance(data, dict) and "preprocess" in data else None
    except (OSError, zipfile.BadZipFile, ValueError, UnicodeDecodeError):
        return None
    return None


def file_entry(path: str) -> Optional[ModelEntry]:
    data = read_file_spec(path)
    if data is None:
        return None
    p = data["preprocess"]
    try:
        spec = PreprocessSpec(resize=p["resize"], crop=int(p["crop"]), interpolation=p["interpolation"],
                              mean=tuple(p.get("mean", IMAGENET_MEAN)), std=tuple(p.get("std", IMAGENET_STD)))
    except (KeyError, TypeError, ConfigError) as e:
        raise ConfigError(f"--ts {path}: its stored preprocessing ({EXTRA_FILE}) is unreadable ({e}); "
                          "export it again, or give --resize/--crop/--interpolation/--mean/--std") from None
    return ModelEntry("file", data.get("model") or path, data.get("tag"), spec,
                      source=f"the spec stored in {os.path.basename(path)} (exported from {data.get('model')}"
                             + (f" {data['tag']}" if data.get("tag") else "") + ")",
                      published=data.get("published"), extra={"stored_source": data.get("source")})


# ---- one resolution for every command -----------------------------------------------------------

@lru_cache(maxsize=64)
def resolve(model: str, weights: Optional[str] = None, ts: Optional[str] = None,
            timm_size: str = "test") -> ModelEntry:
    """The declared preprocessing for `--model`, `--weights` and `--ts` as given (flags and
    --preset are applied over it by engine.config.resolve_config)."""
    if ts:
        entry = file_entry(ts) if os.path.isfile(ts) else None
        if entry is not None:
            return entry
        base = resolve(model, None, None, timm_size)
        return ModelEntry(base.family, base.model, base.tag, base.spec, declared=False, published=base.published,
                          url=base.url, extra=base.extra,
                          source=f"assumed: {os.path.basename(ts)} stores no preprocessing, so --model {model}'s "
                                 f"({base.source})")
    if is_timm(model):
        tag, path = split_weights(weights)
        if tag is not None:
            raise ConfigError(f"--weights {weights}: a timm model's tag is part of --model (timm:ARCH.TAG); "
                              "--weights takes a file (safetensors or a state dict)")
        return timm_entry(model, timm_size)
    tag, path = split_weights(weights)
    if tag is None and path is not None:
        tag = tag_for_file(model, path)
    return torchvision_entry(model, tag)


def list_entries(pattern: Optional[str] = None) -> List[ModelEntry]:
    """Every model and weights tag known, torchvision's and (where installed) timm's, whose name
    matches `pattern` (a shell pattern; `timm:` selects timm's)."""
    pat = pattern or "*"
    if not any(c in pat for c in "*?["):
        pat = f"*{pat}*"
    out: List[ModelEntry] = []
    if not pat.startswith(TIMM_PREFIXES):
        for m in torchvision_models():
            enum = _torchvision_enum(m)
            if enum is None:
                continue
            for w in enum:
                if fnmatch.fnmatchcase(f"{m} {w.name}", pat) or fnmatch.fnmatchcase(m, pat):
                    out.append(torchvision_entry(m, w.name))
    try:
        timm = import_timm()
    except ConfigError:
        return out
    tpat = timm_name(pat) if pat.startswith(TIMM_PREFIXES) else pat
    for name in timm.list_pretrained(tpat):
        try:
            out.append(timm_entry("timm:" + name))
        except ConfigError as e:  # non-square or border crop: listed with the reason
            out.append(ModelEntry("timm", "timm:" + name, name.partition(".")[2], PreprocessSpec(), declared=False,
                                  source=str(e)))
    return out


def format_entry(e: ModelEntry) -> str:
    if e.family == "timm" and not e.declared:
        return f"{e.model:<56} not usable here: {e.source}"
    name = e.model if e.family == "timm" else f"{e.model} --weights {e.tag}"
    return f"{name:<56} {e.describe()}"


def print_models(pattern: Optional[str] = None, out=None) -> int:
    """`run-eval --list-models [PATTERN]`: one line per model and tag; exit status 0, or 2 when nothing matches."""
    import sys

    out = out or sys.stdout
    entries = list_entries(pattern)
    for e in entries:
        print(format_entry(e), file=out)
    try:
        import_timm()
        timm_note = ""
    except ConfigError:
        timm_note = "; timm is not installed (pip install imagenet-engine[timm]) so its models are not listed"
    if not entries:
        print(f"run-eval: error: no model or weights tag matches {pattern!r}{timm_note}", file=sys.stderr)
        return 2
    print(f"{len(entries)} models and weights tags{timm_note}", file=sys.stderr)
    return 0


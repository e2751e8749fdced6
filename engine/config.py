"""One frozen run configuration, resolved from a model preset plus command-line overrides.

`PreprocessSpec` is what the workers need (sizes, interpolation, decode mode) plus what the
backend needs to normalise on the device (mean, std). `RunConfig` is everything else. Both are
frozen: nothing deep in the code mutates the configuration.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

from engine.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
DECODE_MODES = ("exact", "fast", "device")  # device: JPEGs decoded on the GPU (engine/pipeline/encoded.py)
BACKENDS = ("auto", "cpu", "sim", "cuda", "aie", "npu")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # auto: default_precision of the backend that runs


def default_precision(backend: str) -> str:
    """`--precision auto`: fp32 on the host (cpu, sim), fp16 on an accelerator."""
    return "fp32" if backend in ("cpu", "sim") else "fp16"

SHAPES = ("static", "dynamic")


class ConfigError(UsageError):
    """A bad option value; the message says what to change."""


# `--resize`: an int resizes the shorter side to it (torchvision's `Resize(256)`); an (h, w) pair
# resizes the image to exactly that size (`Resize((256, 256))`, the aspect ratio not kept).
Resize = Union[int, Tuple[int, int]]

_RESIZE_HELP = "one number (the shorter side, like 256) or two, H,W (exactly that size, like 256,256)"


def parse_resize(text: str) -> Resize:
    """`--resize` from the command line: "256" (the shorter side) or "256,256" (height, width)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--resize needs {_RESIZE_HELP} (got {text!r})") from None
    if len(values) not in (1, 2) or any(v < 1 for v in values):
        raise ConfigError(f"--resize needs {_RESIZE_HELP}, each at least 1 (got {text!r})")
    return values[0] if len(values) == 1 else (values[0], values[1])


def format_resize(resize: Resize) -> str:
    """The command-line form of a resize, which :func:`parse_resize` reads back: "256" or "256,256"."""
    return str(resize) if isinstance(resize, int) else f"{resize[0]},{resize[1]}"


def describe_resize(resize: Resize) -> str:
    """In words: "shorter side to 256" or "to 256x256 (h x w; the aspect ratio not kept)"."""
    if isinstance(resize, int):
        return f"shorter side to {resize}"
    return f"to exactly {resize[0]}x{resize[1]} (h x w; the aspect ratio not kept)"


def _whole(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_resize(resize) -> Resize:
    """A resize given in code: an int >= 1 or an (h, w) pair of them (a list is taken as a pair)."""
    if _whole(resize):
        if resize < 1:
            raise ConfigError(f"--resize must be positive (got {resize})")
        return int(resize)
    if isinstance(resize, (tuple, list)) and len(resize) == 2 and all(_whole(v) and v >= 1 for v in resize):
        return (int(resize[0]), int(resize[1]))
    raise ConfigError(f"--resize needs {_RESIZE_HELP} (got {resize!r})")


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes model input: resize (the shorter side, or to an exact (h, w)),
    centre-crop, normalise."""

    resize: Resize = 256
    crop: int = 224
    interpolation: str = "bilinear"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    decode: str = "exact"

    def __post_init__(self):
        object.__setattr__(self, "resize", _check_resize(self.resize))  # a list (from JSON) becomes a pair
        if self.crop < 1:
            raise ConfigError(f"--crop must be positive (got {self.crop})")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"--interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}"
            )
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"--decode {self.decode!r} is not one of {', '.join(DECODE_MODES)}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ConfigError(f"--{name} needs three comma-separated numbers (got {value!r})")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"--std values must be positive (got {self.std!r})")

    @property
    def shape(self) -> Tuple[int, int, int]:
        """The uint8 HWC shape of one preprocessed image."""
        return (self.crop, self.crop, 3)


# Preprocessing of the published torchvision weights (the "transforms" of each weights enum).
MODEL_PRESETS = {
    "resnext50_32x4d": PreprocessSpec(),
    "resnext101_32x8d": PreprocessSpec(),
    "resnet18": PreprocessSpec(),
    "resnet34": PreprocessSpec(),
    "resnet50": PreprocessSpec(),
    "resnet101": PreprocessSpec(),
    "resnet152": PreprocessSpec(),
    "wide_resnet50_2": PreprocessSpec(),
    "mobilenet_v2": PreprocessSpec(),
    "mobilenet_v3_large": PreprocessSpec(),
    "vgg16": PreprocessSpec(),
    "densenet121": PreprocessSpec(),
    "alexnet": PreprocessSpec(),
    "squeezenet1_1": PreprocessSpec(),
    "shufflenet_v2_x1_0": PreprocessSpec(),
    "vit_b_16": PreprocessSpec(),
    "inception_v3": PreprocessSpec(resize=342, crop=299),
    "efficientnet_b0": PreprocessSpec(resize=256, crop=224, interpolation="bicubic"),
}


def preset_for(model: str) -> PreprocessSpec:
    """The preprocessing preset of a model name; the ImageNet default for unknown names."""
    return MODEL_PRESETS.get(model, PreprocessSpec())


@dataclass(frozen=True)
class NamedPreset:
    """Preprocessing of a known evaluation script, selected by `--preset NAME`.

    Replaces the model's preset as the starting point; flags still override each field. `source`
    names the script, `figures` are what it reported (model name -> (top-1, top-5)), `notes` what
    it does apart from the preprocessing (which the engine does not copy: it counts in integers).
    """

    name: str
    spec: PreprocessSpec
    source: str
    figures: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    notes: Tuple[str, ...] = ()


# torchvision's published figures for its V1 weights with the model's preset preprocessing
# (the weights enums' `_metrics`); shown beside a named preset's figure.
PUBLISHED_FIGURES = {
    "resnext50_32x4d": (77.618, 93.698),
    "resnet50": (76.130, 92.862),
    "resnet18": (69.758, 89.078),
}

NAMED_PRESETS = {
    "modelzoo-acc-eval": NamedPreset(
        name="modelzoo-acc-eval",
        # Resize([256, 256], interpolation=BICUBIC), CenterCrop([224, 224]), ToTensor(),
        # Normalize(mean=[0.485, 0.456, 0.06], std=[0.229, 0.224, 0.225]): 0.06 where ImageNet's is 0.406
        spec=PreprocessSpec(resize=(256, 256), crop=224, interpolation="bicubic", mean=(0.485, 0.456, 0.06),
                            std=IMAGENET_STD),
        source="Ascend ModelZoo-PyTorch AscendIE/TorchAIE/built-in/cv/classification/ResNeXt50/acc_eval.py",
        figures={"resnext50_32x4d": (71.35, 90.502)},
        notes=(
            "it averages per-step percentages at batch 1: each step is 0 or 100 %, so that is the engine's "
            "integer count (at a larger batch its drop_last=True drops the tail)",
            "it prints every 100 steps: its last line covers every image when their number is a multiple of "
            "100 (ImageNet's 50,000)",
            "it compiles the model at FP16 (--precision fp16 here)",
        ),
    ),
}


def named_preset(name: str) -> NamedPreset:
    """The `--preset NAME`; ConfigError naming the known ones otherwise."""
    try:
        return NAMED_PRESETS[name]
    except KeyError:
        raise ConfigError(f"--preset {name!r} is not one of {', '.join(sorted(NAMED_PRESETS))}") from None


def _show(field_name: str, value) -> str:
    if field_name == "resize":
        return describe_resize(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + ")"
    return str(value)


def preprocess_differences(spec: PreprocessSpec, model: str) -> List[Dict[str, str]]:
    """How `spec` differs from the preprocessing `model`'s weights were evaluated with (its
    preset; torchvision's ImageNet default for a model without one): one entry per field, with
    both values in words. The decode mode is left out (fast mode is reported on its own)."""
    correct = preset_for(model)
    out = []
    for f in dataclasses.fields(PreprocessSpec):
        if f.name == "decode":
            continue
        used, right = getattr(spec, f.name), getattr(correct, f.name)
        if used != right:
            out.append({"field": f.name, "used": _show(f.name, used), "correct": _show(f.name, right)})
    return out


def preprocessing_check(model: str, spec: PreprocessSpec, preset: Optional[str] = None) -> Dict:
    """What a report says about the preprocessing: how it differs from the model's (its preset),
    and with `--preset NAME` where that preset comes from, the figure its script reported for this
    model and torchvision's published figure with the correct preprocessing, side by side."""
    out: Dict = {
        "model_has_preset": model in MODEL_PRESETS,
        "differences": preprocess_differences(spec, model),
    }
    if preset is not None:
        named = named_preset(preset)
        out.update(preset=preset, source=named.source, notes=list(named.notes),
                   script_figure=named.figures.get(model), published_figure=PUBLISHED_FIGURES.get(model),
                   preset_overridden=[f.name for f in dataclasses.fields(PreprocessSpec)
                                      if f.name != "decode" and getattr(spec, f.name) != getattr(named.spec, f.name)])
    return out


def format_preprocessing_check(check: Dict, model: str) -> List[str]:
    """The report's lines for :func:`preprocessing_check` (none without a preset or a difference)."""
    if "preset" not in check:
        return []
    lines = [f"  preset        {check['preset']}: the preprocessing of {check['source']}"]
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
            parts.append(f"torchvision's published figure for its V1 weights with the correct preprocessing "
                         f"{published[0]:.3f} / {published[1]:.3f}")
        lines.append(f"  {model}: " + "; ".join(parts) + " (top-1 / top-5 %)")
    lines.append("  correct run   the same command without --preset (the model's preprocessing); "
                 "docs/modelzoo-reference.md explains the gap")
    for note in check["notes"]:
        lines.append(f"  note          {note}")
    return lines


def parse_devices(text) -> Optional[Tuple[int, ...]]:
    """`--devices`: "0,1", "0-3", "0,2-3" (ids in the order given, no repeats) or "all" (None: every
    device the backend reports, counted inside a device process)."""
    text = str(text).strip()
    if text == "all":
        return None
    ids: List[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                if b < a:
                    raise ValueError
                ids.extend(range(a, b + 1))
            else:
                ids.append(int(part))
    except ValueError:
        raise ConfigError(f"--devices needs device ids like 0,1 or 0-7, or all (got {text!r})") from None
    if not ids or min(ids) < 0:
        raise ConfigError(f"--devices needs device ids of 0 or more, like 0,1 or 0-7, or all (got {text!r})")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--devices names a device twice (got {text!r}): each id once")
    return tuple(ids)


def format_devices(ids: Optional[Tuple[int, ...]]) -> str:
    """The canonical form of a `--devices` value: "all" or "0,1,2"."""
    return "all" if ids is None else ",".join(str(i) for i in ids)


@dataclass(frozen=True)
class DataOptions:
    """What to read: `--data`, `--labels`, `--limit`, and the model's number of classes."""

    path: Optional[str] = None  # --data
    labels: Optional[str] = None
    limit: Optional[int] = None
    num_classes: int = 1000

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1 (got {self.limit})")


@dataclass(frozen=True)
class ModelOptions:
    """Which model: a name (`--model`), its weights (`--weights`), or a TorchScript file (`--ts`)."""

    name: str = "resnext50_32x4d"  # --model
    weights: Optional[str] = None
    ts: Optional[str] = None

    def __post_init__(self):
        if self.weights is not None and self.ts is not None:
            raise ConfigError("give either --weights (a state dict) or --ts (TorchScript), not both")


@dataclass(frozen=True)
class AieOptions:
    """torch_aie's compile options (`--soc-version`, `--optimization-level`)."""

    soc_version: str = "Ascend310P3"
    optimization_level: int = 0

    def __post_init__(self):
        if self.optimization_level not in (0, 1, 2):
            raise ConfigError(f"--optimization-level must be 0, 1 or 2 (got {self.optimization_level})")


@dataclass(frozen=True)
class SimOptions:
    """The simulated accelerator: device time per batch (`--sim-batch-ms`), copy bandwidth (`--sim-h2d-gbps`)."""

    batch_ms: float = 10.0
    h2d_gbps: float = 0.0  # 0: copies are free

    def __post_init__(self):
        if self.batch_ms < 0 or self.h2d_gbps < 0:
            raise ConfigError("--sim-batch-ms and --sim-h2d-gbps must not be negative")


@dataclass(frozen=True)
class CudaOptions:
    """The cuda backend: replay the model as a CUDA graph (`--cuda-graphs`; static shapes, padded batches)."""

    graphs: bool = False


@dataclass(frozen=True)
class BackendOptions:
    """Where the model runs: the backend and its device(s), precision, shapes, compile cache, and
    each backend's own options."""

    name: str = "cpu"  # --backend
    device: int = 0
    devices: str = ""  # --devices: "" one device in this process; "0,1", "0-7" or "all": device processes
    precision: str = "fp32"
    shape: str = "static"
    cache_dir: Optional[str] = None
    use_cache: bool = True
    threads: int = 0  # torch intra-op threads for the cpu backend; 0: cores left by workers
    aie: AieOptions = field(default_factory=AieOptions)
    sim: SimOptions = field(default_factory=SimOptions)
    cuda: CudaOptions = field(default_factory=CudaOptions)

    def __post_init__(self):
        if self.name not in BACKENDS:
            raise ConfigError(f"--backend {self.name!r} is not one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.shape not in SHAPES:
            raise ConfigError(f"--shape {self.shape!r} is not one of {', '.join(SHAPES)}")
        if self.devices:
            object.__setattr__(self, "devices", format_devices(parse_devices(self.devices)))


@dataclass(frozen=True)
class PipelineOptions:
    """How images reach the device: batches, decode workers, the ring, batches in flight, the pixel
    cache, and the limits that turn a bad image into a failed one."""

    batch_size: int = 64  # 0: --batch-size auto (resolved by engine.pipeline.autotune before the run)
    workers: int = 1  # 0: --workers auto (likewise)
    ring_slots: int = 0  # 0: derived from workers and in-flight batches
    inflight: int = 3  # per device
    compute_only_iters: int = 0  # 0: chosen from the backend's speed
    max_image_pixels: Optional[int] = None  # decompression-bomb limit; None: Pillow's (178,956,970)
    image_timeout: float = 120.0  # seconds on one image before its worker is killed (and the image retried)
    pixel_cache: Optional[str] = None  # --pixel-cache: folder of the exact pixel cache; None: no cache
    cache_verify: bool = False  # --cache-verify: the cache key also hashes each image file's content
    progress: bool = True

    def __post_init__(self):
        if self.batch_size < 0:
            raise ConfigError(f"--batch-size must be at least 1, or auto (got {self.batch_size})")
        if self.workers < 0:
            raise ConfigError(f"--workers must be at least 1, or auto (got {self.workers})")
        if self.inflight < 1:
            raise ConfigError(f"in-flight batches must be at least 1 (got {self.inflight})")
        if self.ring_slots and self.ring_slots < 2:
            raise ConfigError(f"--ring-slots must be at least 2 (got {self.ring_slots})")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ConfigError(f"--max-image-pixels must be at least 1 (got {self.max_image_pixels})")
        if self.image_timeout <= 0:
            raise ConfigError(f"--image-timeout must be positive (got {self.image_timeout})")

    @property
    def slots(self) -> int:
        """Ring slots of a one-device run (`slots_for`)."""
        return self.slots_for(1)

    def slots_for(self, devices: int) -> int:
        """Ring slots: enough for every batch in flight on every device plus batches being filled
        (a pixel-cache-fed run keeps as many batches read ahead), unless --ring-slots says."""
        return self.ring_slots or self.inflight * max(1, devices) + 2


@dataclass(frozen=True)
class DeviceDecodeOptions:
    """`--decode device` (engine/pipeline/encoded.py, engine/backends/decodestage.py)."""

    host_decode_share: float = -1.0  # share of device-decodable JPEGs the workers decode; -1: auto
    arena_kib: int = 256  # --decode-arena-kib: compressed bytes per image in a ring slot's arena
    jpeg_decoder: str = "torchvision"  # the device decoder behind gpudecode.JpegDecoder
    resize: str = "pil"  # --device-resize: pil, Pillow's arithmetic on tensors; tensor, torchvision's

    def __post_init__(self):
        if not (self.host_decode_share == -1.0 or 0.0 <= self.host_decode_share <= 1.0):
            raise ConfigError(f"--host-decode-share must be between 0 and 1, or auto (got {self.host_decode_share})")
        if self.resize not in ("pil", "tensor"):
            raise ConfigError(f"--device-resize {self.resize!r} is not one of pil, tensor")
        if self.arena_kib < 4:
            raise ConfigError(f"--decode-arena-kib must be at least 4 (got {self.arena_kib})")


@dataclass(frozen=True)
class ReportOptions:
    """What the report counts beside top-1/top-5, and per-image rows (engine/report/labelsets.py,
    engine/report/analysis.py)."""

    real_labels: Optional[str] = None  # --real-labels: a real.json (labelsets.REAL_PACKAGED: the shipped copy)
    class_subset: str = "auto"  # --class-subset auto|present|none: which outputs may win top-k
    class_map: Optional[str] = None  # --class-map FILE: 'FOLDER CLASS' lines
    per_image: Optional[str] = None  # --per-image PATH: one row per image (.parquet or .csv)

    def __post_init__(self):
        if self.class_subset not in ("auto", "present", "none"):
            raise ConfigError(f"--class-subset {self.class_subset!r} is not one of auto, present, none")


@dataclass(frozen=True)
class OutputOptions:
    """Where the report goes besides stdout: `--json`, `--trace`."""

    json_path: Optional[str] = None
    trace_path: Optional[str] = None  # --trace: Chrome/Perfetto trace-event JSON of the run


# Every option by its flat name (the command-line flag's dest), and where it lives:
# (section, [sub-section,] field). `resolve_config(**flat)` and `RunConfig.replace(**flat)` take
# these names; engine/cli.py takes each flag's default from here, so none is written twice.
FLAT_FIELDS: Dict[str, Tuple[str, ...]] = {
    "data": ("data", "path"), "labels": ("data", "labels"), "limit": ("data", "limit"),
    "num_classes": ("data", "num_classes"),
    "model": ("model", "name"), "weights": ("model", "weights"), "ts": ("model", "ts"),
    "backend": ("backend", "name"), "device": ("backend", "device"), "devices": ("backend", "devices"),
    "precision": ("backend", "precision"), "shape": ("backend", "shape"), "cache_dir": ("backend", "cache_dir"),
    "use_cache": ("backend", "use_cache"), "threads": ("backend", "threads"),
    "soc_version": ("backend", "aie", "soc_version"), "optimization_level": ("backend", "aie", "optimization_level"),
    "sim_batch_ms": ("backend", "sim", "batch_ms"), "sim_h2d_gbps": ("backend", "sim", "h2d_gbps"),
    "cuda_graphs": ("backend", "cuda", "graphs"),
    "batch_size": ("pipeline", "batch_size"), "workers": ("pipeline", "workers"),
    "ring_slots": ("pipeline", "ring_slots"), "inflight": ("pipeline", "inflight"),
    "compute_only_iters": ("pipeline", "compute_only_iters"), "max_image_pixels": ("pipeline", "max_image_pixels"),
    "image_timeout": ("pipeline", "image_timeout"), "pixel_cache": ("pipeline", "pixel_cache"),
    "cache_verify": ("pipeline", "cache_verify"), "progress": ("pipeline", "progress"),
    "host_decode_share": ("device_decode", "host_decode_share"), "decode_arena_kib": ("device_decode", "arena_kib"),
    "jpeg_decoder": ("device_decode", "jpeg_decoder"), "device_resize": ("device_decode", "resize"),
    "json_path": ("output", "json_path"), "trace_path": ("output", "trace_path"),
    "real_labels": ("report", "real_labels"), "class_subset": ("report", "class_subset"),
    "class_map": ("report", "class_map"), "per_image": ("report", "per_image"),
}
_SECTIONS = {"data": DataOptions, "model": ModelOptions, "backend": BackendOptions, "pipeline": PipelineOptions,
             "device_decode": DeviceDecodeOptions, "report": ReportOptions, "output": OutputOptions}
_SUB = {"aie": AieOptions, "sim": SimOptions, "cuda": CudaOptions}


def flat_default(name: str):
    """The default of an option by its flat name (its section's field default)."""
    where = FLAT_FIELDS[name]
    cls = _SECTIONS[where[0]] if len(where) == 2 else _SUB[where[1]]
    return {f.name: f.default for f in dataclasses.fields(cls)}[where[-1]]


@dataclass(frozen=True)
class RunConfig:
    """Everything one run of the engine needs, in sections. Built by `resolve_config`; every option
    also has a flat name (FLAT_FIELDS: the flag's) that `resolve_config` and `replace` take."""

    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    backend: BackendOptions = field(default_factory=BackendOptions)
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    preset: Optional[str] = None  # --preset NAME: the named preset the preprocessing started from
    device_decode: DeviceDecodeOptions = field(default_factory=DeviceDecodeOptions)
    report: ReportOptions = field(default_factory=ReportOptions)
    output: OutputOptions = field(default_factory=OutputOptions)

    def __post_init__(self):
        if self.pipeline.pixel_cache and self.preprocess.decode == "device":
            raise ConfigError("--pixel-cache keeps host-decoded pixels and --decode device decodes on the GPU: "
                              "use --pixel-cache with --decode exact or fast, or drop it")

    @classmethod
    def from_flat(cls, **flat) -> "RunConfig":
        """A RunConfig from flat option names (and section objects, `preprocess`, `preset`)."""
        return RunConfig().replace(**flat)

    def replace(self, **changes) -> "RunConfig":
        """A copy with options changed, by flat name (`batch_size=32`) or whole section."""
        sections: Dict[str, Dict] = {}
        subs: Dict[str, Dict] = {}
        whole: Dict = {}
        for name, value in changes.items():
            if name in FLAT_FIELDS:
                where = FLAT_FIELDS[name]
                if len(where) == 2:
                    sections.setdefault(where[0], {})[where[1]] = value
                else:
                    subs.setdefault(where[1], {})[where[2]] = value
            elif name in RunConfig.__dataclass_fields__:
                whole[name] = value
            else:
                raise TypeError(f"RunConfig has no option {name!r}")
        backend = whole.get("backend", self.backend)
        if subs:
            backend = dataclasses.replace(backend, **{k: dataclasses.replace(getattr(backend, k), **v)
                                                      for k, v in subs.items()})
            whole["backend"] = backend
        for sec, values in sections.items():
            whole[sec] = dataclasses.replace(whole.get(sec, getattr(self, sec)), **values)
        return dataclasses.replace(self, **whole) if whole else self

    def flat(self) -> Dict:
        """Every option by its flat name."""
        out = {}
        for name, where in FLAT_FIELDS.items():
            obj = self
            for part in where:
                obj = getattr(obj, part)
            out[name] = obj
        return out

    def to_dict(self) -> dict:
        """The configuration as a report shows it, section by section."""
        return dataclasses.asdict(self)


def default_cache_dir() -> str:
    """Where compiled models and generated data are cached (`$IMAGENET_ENGINE_CACHE`)."""
    base = os.environ.get("IMAGENET_ENGINE_CACHE")
    if base:
        return base
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "imagenet-engine")


def parse_triple(text: str, flag: str) -> Tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} needs three comma-separated numbers, like 0.485,0.456,0.406 (got {text!r})")
    if len(values) != 3:
        raise ConfigError(f"{flag} needs three comma-separated numbers, like 0.485,0.456,0.406 (got {text!r})")
    return values[0], values[1], values[2]


def resolve_config(model: str = "resnext50_32x4d", preprocess_overrides: Optional[dict] = None,
                   preset: Optional[str] = None, **fields) -> RunConfig:
    """The named `preset` (else the model's), with every non-None preprocessing override applied,
    and the run fields."""
    spec = named_preset(preset).spec if preset is not None else preset_for(model)
    overrides = {k: v for k, v in (preprocess_overrides or {}).items() if v is not None}
    if overrides:
        spec = dataclasses.replace(spec, **overrides)
    return RunConfig.from_flat(model=model, preprocess=spec, preset=preset, **fields)


def config_from_dict(d: Dict) -> RunConfig:
    """A `RunConfig` back from `to_dict()` (or its JSON): how a device process gets its run's
    configuration (engine/pipeline/device_process.py). Unknown keys are refused."""
    def build(cls, values: Dict):
        kw = {}
        for k, v in values.items():
            f = cls.__dataclass_fields__[k]
            if k == "preprocess":
                v = build(PreprocessSpec, v)
            elif k in ("mean", "std"):
                v = tuple(v)
            elif isinstance(v, dict) and dataclasses.is_dataclass(f.default_factory if f.default_factory
                                                                    is not dataclasses.MISSING else None):
                v = build(f.default_factory, v)
            kw[k] = v
        return cls(**kw)

    return build(RunConfig, dict(d))

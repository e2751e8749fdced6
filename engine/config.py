"""One frozen run configuration, resolved from a model preset plus command-line overrides.

`PreprocessSpec` is what the workers need (sizes, interpolation, decode mode) plus what the
backend needs to normalise on the device (mean, std). `RunConfig` is everything else. Both are
frozen: nothing deep in the code mutates the configuration.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

# the preprocessing spec and its helpers live in engine/spec.py; re-exported here
from engine.spec import (DECODE_MODES, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, ConfigError,  # noqa: F401
                         PreprocessSpec, Resize, describe_resize, format_resize, parse_resize)

BACKENDS = ("auto", "cpu", "sim", "cuda", "aie", "npu")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # auto: default_precision of the backend that runs


def default_precision(backend: str) -> str:
    """`--precision auto`: fp32 on the host (cpu, sim), fp16 on an accelerator."""
    return "fp32" if backend in ("cpu", "sim") else "fp16"

SHAPES = ("static", "dynamic")


def preset_for(model: str, weights: Optional[str] = None, ts: Optional[str] = None,
               timm_size: str = "test") -> PreprocessSpec:
    """The preprocessing `model`'s weights declare (torchvision's weights enum, timm's pretrained_cfg,
    the spec stored in a --ts file): engine/models/catalog.py; the ImageNet default for unknown names."""
    from engine.models.catalog import resolve

    return resolve(model, weights, ts, timm_size).spec


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


def preprocess_differences(spec: PreprocessSpec, model: str, **declared) -> List[Dict[str, str]]:
    """How `spec` differs from what `model`'s weights declare (engine/models/provenance.py)."""
    from engine.models.provenance import preprocess_differences as differences

    return differences(spec, model, **declared)


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
    weights: Optional[str] = None  # a tag (IMAGENET1K_V2, DEFAULT), a file, or TAG=FILE
    ts: Optional[str] = None
    timm_input_size: str = "test"  # --timm-input-size: timm's test size (validate.py's) or its train size

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
    "timm_input_size": ("model", "timm_input_size"),
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
    """The named `preset` (else what the model's weights or the --ts file declare), with every
    non-None preprocessing override applied, and the run fields."""
    spec = named_preset(preset).spec if preset is not None else preset_for(
        model, fields.get("weights"), fields.get("ts"), fields.get("timm_input_size", "test"))
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

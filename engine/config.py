"""One frozen run configuration, resolved from a model preset plus command-line overrides.

`PreprocessSpec` is what the workers need (sizes, interpolation, decode mode) plus what the
backend needs to normalise on the device (mean, std). `RunConfig` is everything else. Both are
frozen: nothing deep in the code mutates the configuration.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
DECODE_MODES = ("exact", "fast", "device")  # device: JPEGs decoded on the GPU (engine/pipeline/encoded.py)
BACKENDS = ("auto", "cpu", "sim", "cuda", "aie", "npu")
PRECISIONS = ("fp32", "fp16", "bf16")
SHAPES = ("static", "dynamic")


class ConfigError(ValueError):
    """A bad option value; the message says what to change."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes model input: resize the shorter side, centre-crop, normalise."""

    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    decode: str = "exact"

    def __post_init__(self):
        if self.resize < 1 or self.crop < 1:
            raise ConfigError(f"--resize and --crop must be positive (got {self.resize}, {self.crop})")
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
class RunConfig:
    """Everything one run of the engine needs. Built by `resolve_config`."""

    data: Optional[str] = None
    labels: Optional[str] = None
    limit: Optional[int] = None
    model: str = "resnext50_32x4d"
    weights: Optional[str] = None
    ts: Optional[str] = None
    backend: str = "cpu"
    device: int = 0
    precision: str = "fp32"
    shape: str = "static"
    soc_version: str = "Ascend310P3"
    optimization_level: int = 0
    cache_dir: Optional[str] = None
    use_cache: bool = True
    batch_size: int = 64  # 0: --batch-size auto (resolved by engine.pipeline.autotune before the run)
    workers: int = 1  # 0: --workers auto (likewise)
    ring_slots: int = 0  # 0: derived from workers and in-flight batches
    inflight: int = 3
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    num_classes: int = 1000
    sim_batch_ms: float = 10.0
    sim_h2d_gbps: float = 0.0  # 0: copies are free
    compute_only_iters: int = 0  # 0: chosen from the backend's speed
    threads: int = 0  # torch intra-op threads for the cpu backend; 0: cores left by workers
    cuda_graphs: bool = False  # cuda: replay the model as a CUDA graph (static shapes, padded batches)
    max_image_pixels: Optional[int] = None  # decompression-bomb limit; None: Pillow's (178,956,970)
    image_timeout: float = 120.0  # seconds on one image before its worker is killed (and the image retried)
    json_path: Optional[str] = None
    trace_path: Optional[str] = None  # --trace: Chrome/Perfetto trace-event JSON of the run
    progress: bool = True
    # --decode device (engine/pipeline/encoded.py, engine/backends/gpudecode.py)
    host_decode_share: float = -1.0  # share of device-decodable JPEGs the workers decode; -1: auto
    decode_arena_kib: int = 256  # compressed bytes per image in a ring slot's arena
    jpeg_decoder: str = "torchvision"  # the device decoder behind gpudecode.JpegDecoder
    device_resize: str = "pil"  # pil: Pillow's fixed-point arithmetic on tensors; tensor: torchvision's float resize

    def __post_init__(self):
        if self.batch_size < 0:
            raise ConfigError(f"--batch-size must be at least 1, or auto (got {self.batch_size})")
        if self.workers < 0:
            raise ConfigError(f"--workers must be at least 1, or auto (got {self.workers})")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1 (got {self.limit})")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.shape not in SHAPES:
            raise ConfigError(f"--shape {self.shape!r} is not one of {', '.join(SHAPES)}")
        if self.optimization_level not in (0, 1, 2):
            raise ConfigError(f"--optimization-level must be 0, 1 or 2 (got {self.optimization_level})")
        if self.sim_batch_ms < 0 or self.sim_h2d_gbps < 0:
            raise ConfigError("--sim-batch-ms and --sim-h2d-gbps must not be negative")
        if self.inflight < 1:
            raise ConfigError(f"in-flight batches must be at least 1 (got {self.inflight})")
        if self.ring_slots and self.ring_slots < 2:
            raise ConfigError(f"--ring-slots must be at least 2 (got {self.ring_slots})")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ConfigError(f"--max-image-pixels must be at least 1 (got {self.max_image_pixels})")
        if self.image_timeout <= 0:
            raise ConfigError(f"--image-timeout must be positive (got {self.image_timeout})")
        if not (self.host_decode_share == -1.0 or 0.0 <= self.host_decode_share <= 1.0):
            raise ConfigError(f"--host-decode-share must be between 0 and 1, or auto (got {self.host_decode_share})")
        if self.device_resize not in ("pil", "tensor"):
            raise ConfigError(f"--device-resize {self.device_resize!r} is not one of pil, tensor")
        if self.decode_arena_kib < 4:
            raise ConfigError(f"--decode-arena-kib must be at least 4 (got {self.decode_arena_kib})")
        if self.weights is not None and self.ts is not None:
            raise ConfigError("give either --weights (a state dict) or --ts (TorchScript), not both")

    @property
    def slots(self) -> int:
        """Ring slots: enough for every batch in flight on the device plus batches being filled."""
        if self.ring_slots:
            return self.ring_slots
        return self.inflight + 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


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
    return values  # type: ignore[return-value]


def resolve_config(model: str = "resnext50_32x4d", preprocess_overrides: Optional[dict] = None, **fields) -> RunConfig:
    """The model's preset, with every non-None preprocessing override applied, and the run fields."""
    spec = preset_for(model)
    overrides = {k: v for k, v in (preprocess_overrides or {}).items() if v is not None}
    if overrides:
        spec = dataclasses.replace(spec, **overrides)
    return RunConfig(model=model, preprocess=spec, **fields)

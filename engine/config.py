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
PRECISIONS = ("fp32", "fp16", "bf16")
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


def preprocessing_check(model: str, spec: PreprocessSpec, preset: Optional[str] = None, **declared) -> Dict:
    """Where each preprocessing field came from, how the spec differs from the weights' declaration,
    the published figures; with --preset, that script's origin (engine/models/provenance.py)."""
    from engine.models.provenance import preprocessing_check as check

    return check(model, spec, named_preset(preset) if preset is not None else None, **declared)


def format_preprocessing_check(check: Dict, model: str, top1: Optional[float] = None,
                               top5: Optional[float] = None) -> List[str]:
    from engine.models.provenance import format_preprocessing_check as fmt

    return fmt(check, model, top1, top5)


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
    timm_input_size: str = "test"  # --timm-input-size: timm's test size (validate.py's) or its train size
    preset: Optional[str] = None  # --preset NAME: the named preset the preprocessing started from
    num_classes: int = 1000
    sim_batch_ms: float = 10.0
    sim_h2d_gbps: float = 0.0  # 0: copies are free
    compute_only_iters: int = 0  # 0: chosen from the backend's speed
    threads: int = 0  # torch intra-op threads for the cpu backend; 0: cores left by workers
    cuda_graphs: bool = False  # cuda: replay the model as a CUDA graph (static shapes, padded batches)
    max_image_pixels: Optional[int] = None  # decompression-bomb limit; None: Pillow's (178,956,970)
    image_timeout: float = 120.0  # seconds on one image before its worker is killed (and the image retried)
    pixel_cache: Optional[str] = None  # --pixel-cache: folder of the exact pixel cache; None: no cache
    cache_verify: bool = False  # --cache-verify: the cache key also hashes each image file's content
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
        if self.pixel_cache and self.preprocess.decode == "device":
            raise ConfigError("--pixel-cache keeps host-decoded pixels and --decode device decodes on the GPU: "
                              "use --pixel-cache with --decode exact or fast, or drop it")

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


def resolve_config(model: str = "resnext50_32x4d", preprocess_overrides: Optional[dict] = None,
                   preset: Optional[str] = None, **fields) -> RunConfig:
    """The named `preset` (else what the model's weights or the --ts file declare), with every
    non-None preprocessing override applied, and the run fields."""
    spec = named_preset(preset).spec if preset is not None else preset_for(
        model, fields.get("weights"), fields.get("ts"), fields.get("timm_input_size", "test"))
    overrides = {k: v for k, v in (preprocess_overrides or {}).items() if v is not None}
    if overrides:
        spec = dataclasses.replace(spec, **overrides)
    return RunConfig(model=model, preprocess=spec, preset=preset, **fields)

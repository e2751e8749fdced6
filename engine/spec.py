"""The preprocessing spec: how an image becomes model input (resize, centre crop, interpolation,
mean, std, decode mode), and the error a bad value raises. Its own module so that where a spec
comes from (engine/models/catalog.py) and the run configuration (engine/config.py, which
re-exports all of this) do not import each other.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Tuple, Union

from engine.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
DECODE_MODES = ("exact", "fast", "device")  # device: JPEGs decoded on the GPU (engine/pipeline/encoded.py)


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

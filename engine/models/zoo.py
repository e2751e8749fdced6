"""Loading the model (torchvision by name, a state dict, or TorchScript) and the on-device input
adapter that turns the ring's uint8 NHWC batch into normalised float NCHW.

Imports torch: only backends import this module.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from engine.backends.base import BackendError
from engine.files import file_sha256
from engine.config import RunConfig


class InputAdapter(nn.Module):
    """uint8 `[N, H, W, 3]` -> float `[N, 3, H, W]` (channels_last memory), normalised.

    The arithmetic is torchvision's `ToTensor` then `Normalize`: `x / 255`, then `(x - mean) / std`,
    in float32, so the result equals the reference within float rounding of the same operations.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.out_dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float().div(255.0)  # NHWC storage is channels_last NCHW
        x = x.sub(self.mean).div(self.std)
        return x.to(self.out_dtype)


class WithInput(nn.Module):
    """The adapter and the model as one module, so both compile into one graph."""

    def __init__(self, adapter: nn.Module, model: nn.Module):
        super().__init__()
        self.adapter = adapter
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.adapter(x))


def cached_torchvision_weights(model: str) -> Optional[str]:
    """The V1 ImageNet weights of `model` in torchvision's download cache, if present.

    Only V1 weights match the default presets (resize 256, crop 224); nothing is downloaded.
    """
    try:
        from torchvision.models import get_model_weights

        url = get_model_weights(model).IMAGENET1K_V1.url
    except Exception:
        return None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    return path if os.path.isfile(path) else None


def load_state_dict(path: str) -> dict:
    """A state dict from an untrusted file: tensors only (`weights_only=True`) where torch has it."""
    if not os.path.isfile(path):
        raise BackendError(f"--weights {path}: no such file")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except TypeError:  # torch < 1.13 has no weights_only
            print("warning: this torch cannot load weights safely (no weights_only); loading with pickle",
                  file=sys.stderr)
            sd = torch.load(path, map_location="cpu")
    except Exception as e:
        raise BackendError(f"--weights {path}: not a readable PyTorch state dict ({type(e).__name__}: {e})"[:600])
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise BackendError(f"--weights {path}: holds a {type(sd).__name__}, not a state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def build_torchvision(model: str, weights: Optional[str], num_classes: int = 1000) -> Tuple[nn.Module, str]:
    """A torchvision model with weights from a file, the cache, or random. Returns (model, source)."""
    import torchvision

    try:
        net = torchvision.models.get_model(model, weights=None, num_classes=num_classes)
    except (ValueError, KeyError):
        names = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models))[:12])
        raise BackendError(f"--model {model}: not a torchvision classification model (for example: {names}, ...)")
    source = weights or cached_torchvision_weights(model)
    if source is None:
        print(f"warning: no weights for {model} (give --weights FILE.pth); using random weights, "
              "so the accuracy means nothing", file=sys.stderr)
        torch.manual_seed(0)
        net = torchvision.models.get_model(model, weights=None, num_classes=num_classes)
        return net.eval(), "random"
    sd = load_state_dict(source)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()
        detail = " ".join(line.strip() for line in first[1:3])
        raise BackendError(f"--weights {source} does not fit --model {model}: {detail[:400]}"
                           " (check --model, or export the matching architecture)")
    return net.eval(), source


@contextmanager
def quiet_jit():
    """Silence torch >= 2.9's FutureWarnings that TorchScript is deprecated (--ts and torch_aie need it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*")
        yield


def load_torchscript(path: str, map_location: str = "cpu") -> nn.Module:
    if not os.path.isfile(path):
        raise BackendError(f"--ts {path}: no such file")
    try:
        with quiet_jit():
            return torch.jit.load(path, map_location=map_location).eval()
    except Exception as e:
        raise BackendError(f"--ts {path}: not a loadable TorchScript file ({type(e).__name__}: {str(e)[:300]})")


def build_model(config: RunConfig) -> Tuple[nn.Module, dict]:
    """The model as the config names it; returns (eval-mode module, description for the report)."""
    if config.ts:
        return load_torchscript(config.ts), {"model": config.model, "source": "torchscript", "ts": config.ts,
                                             "sha256": file_sha256(config.ts)}
    net, source = build_torchvision(config.model, config.weights, config.num_classes)
    info = {"model": config.model, "source": "torchvision", "weights": source}
    if source != "random":
        info["sha256"] = file_sha256(source)
    return net, info

"""Loading the model (torchvision by name, a state dict, or TorchScript) and the on-device input
adapter that turns the ring's uint8 NHWC batch into normalised float NCHW.

Imports torch: only backends import this module.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from typing import Dict, Optional, Sequence, Tuple

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


#: set to 1 to never download weights (the tests set it: they must not reach the network)
NO_DOWNLOAD_ENV = "IMAGENET_ENGINE_NO_DOWNLOAD"
DOWNLOAD_TIMEOUT_S = 20.0
_download_failed: Dict[str, str] = {}  # url -> why, so one process tries each url once


def _weights_url(model: str, tag: str) -> Optional[str]:
    try:
        from torchvision.models import get_model_weights

        enum = get_model_weights(model)
        return (enum.DEFAULT if tag == "DEFAULT" else enum[tag]).url
    except Exception:
        return None


def _checkpoint_path(url: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def cached_torchvision_weights(model: str, tag: Optional[str] = None) -> Optional[str]:
    """The file of `model`'s weights `tag` (default: the V1 tag) in torchvision's download cache, if present."""
    url = _weights_url(model, tag or _default_tag(model))
    if url is None:
        return None
    path = _checkpoint_path(url)
    return path if os.path.isfile(path) else None


def _default_tag(model: str) -> str:
    from engine.models.catalog import _torchvision_enum, default_tag

    enum = _torchvision_enum(model)
    return default_tag(enum) if enum is not None else "IMAGENET1K_V1"


def download_weights(url: str, path: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch `url` into `path` the way torchvision does (its file names end in the first hex
    digits of the file's sha256, which are checked), atomically: a cut download leaves no file."""
    import hashlib
    import re
    import urllib.request

    m = re.search(r"-([a-f0-9]{6,})\.", os.path.basename(url))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.partial.{os.getpid()}"
    sha = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            while True:
                block = r.read(1 << 20)
                if not block:
                    break
                sha.update(block)
                f.write(block)
        if m and not sha.hexdigest().startswith(m.group(1)):
            raise OSError(f"sha256 {sha.hexdigest()[:12]}... does not start with {m.group(1)} (a corrupt download)")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def torchvision_weights(model: str, environ=os.environ, tag: Optional[str] = None) -> Tuple[Optional[str], str]:
    """(path, how) of `model`'s weights `tag` (default: IMAGENET1K_V1, else the model's DEFAULT):
    torchvision's cache, else a download through torchvision's URL (hash-checked) unless
    $IMAGENET_ENGINE_NO_DOWNLOAD=1; (None, why) without."""
    tag = tag or _default_tag(model)
    url = _weights_url(model, tag)
    if url is None:
        return None, f"torchvision has no {tag} weights for {model}"
    path = _checkpoint_path(url)
    if os.path.isfile(path):
        return path, "torchvision's cache"
    if environ.get(NO_DOWNLOAD_ENV, "") not in ("", "0"):
        return None, f"not in torchvision's cache ({path}) and {NO_DOWNLOAD_ENV} is set"
    if url not in _download_failed:
        print(f"downloading {model} {tag} weights: {url} -> {path}", file=sys.stderr)
        try:
            download_weights(url, path)
            return path, "downloaded"
        except Exception as e:  # offline, refused, cut, wrong hash: random weights with a warning
            _download_failed[url] = f"{type(e).__name__}: {e}"[:300]
    return None, f"not in torchvision's cache ({path}) and the download failed ({_download_failed[url]})"


def timm_weights(model: str, environ=os.environ) -> Tuple[Optional[str], str]:
    """(path, how) of a timm tag's weights: the Hugging Face Hub cache, else a download from the Hub
    unless $IMAGENET_ENGINE_NO_DOWNLOAD=1 (or HF_HUB_OFFLINE=1); (None, why) without."""
    from engine.models.catalog import timm_name, timm_pretrained_cfg

    name, cfg = timm_pretrained_cfg(timm_name(model))
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return None, f"timm declares no Hugging Face Hub file for {name}"
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        return None, "huggingface_hub is not installed (pip install imagenet-engine[timm])"
    names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
    for fn in names:
        hit = try_to_load_from_cache(hub_id, fn)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit, "the Hugging Face Hub cache"
    offline = [v for v in (NO_DOWNLOAD_ENV, "HF_HUB_OFFLINE") if environ.get(v, "") not in ("", "0")]
    if offline:
        return None, f"not in the Hugging Face Hub cache ({hub_id}) and {offline[0]} is set"
    key = "hf:" + hub_id
    if key not in _download_failed:
        import logging
        import socket
        from urllib.parse import urlparse

        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        try:  # a host that does not resolve fails now, not after the Hub client's retries
            socket.getaddrinfo(host, 443)
        except OSError as e:
            _download_failed[key] = f"{host} is not reachable: {e}"
    if key not in _download_failed:
        print(f"downloading {name} weights from the Hugging Face Hub: {hub_id}/{names[0]}", file=sys.stderr)
        hub_log = logging.getLogger("huggingface_hub")
        level = hub_log.level
        hub_log.setLevel(logging.ERROR)  # its retry warnings; a failure is said once below
        try:
            return hf_hub_download(hub_id, names[0]), "downloaded"
        except Exception as e:  # offline, refused, missing: random weights with a warning
            _download_failed[key] = f"{type(e).__name__}: {e}"[:300]
        finally:
            hub_log.setLevel(level)
    return None, f"not in the Hugging Face Hub cache ({hub_id}) and the download failed ({_download_failed[key]})"


def resolve_weights(model: str, weights: Optional[str], environ=os.environ) -> Tuple[Optional[str], str, Optional[str]]:
    """`--weights` (a tag, a file, TAG=FILE, or None) -> (file or None, how, tag): the one place a tag
    becomes a file, so the backends, the compile cache and run-score's run.json see its sha256."""
    from engine.models.catalog import is_timm, split_weights, tag_for_file

    tag, path = split_weights(weights)
    if is_timm(model):
        if path:
            return path, "--weights", None
        found, how = timm_weights(model, environ)
        return found, how, None
    if path:
        return path, "--weights", tag or tag_for_file(model, path) or _default_tag(model)
    tag = tag or _default_tag(model)
    found, how = torchvision_weights(model, environ, tag)
    return found, how, tag


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


_warned: set = set()  # (model, why): said once per process (autotune and the run both build the model)


def _random_warning(model: str, why: str) -> None:
    if (model, why) in _warned:
        return
    _warned.add((model, why))
    print(f"warning: no weights for {model}: {why}; using random weights, so the accuracy means nothing "
          "(give --weights FILE)", file=sys.stderr)


def _load_into(net: nn.Module, source: str, model: str) -> None:
    sd = load_weights_file(source)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()
        detail = " ".join(line.strip() for line in first[1:3])
        raise BackendError(f"--weights {source} does not fit --model {model}: {detail[:400]}"
                           " (check --model, or export the matching architecture)")


def load_weights_file(path: str) -> dict:
    """A state dict from a safetensors file or a PyTorch file (tensors only)."""
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise BackendError(f"--weights {path}: no such file")
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise BackendError(f"--weights {path}: reading safetensors needs the safetensors package "
                               "(pip install imagenet-engine[timm])") from None
        try:
            return load_file(path, device="cpu")
        except Exception as e:
            raise BackendError(f"--weights {path}: not a readable safetensors file ({type(e).__name__}: {e})"[:600])
    return load_state_dict(path)


def build_torchvision(model: str, weights: Optional[str], num_classes: int = 1000) -> Tuple[nn.Module, str]:
    """A torchvision model with weights from a file, a tag's file (cache or download), or random.
    Returns (model, source)."""
    import torchvision

    try:
        net = torchvision.models.get_model(model, weights=None, num_classes=num_classes)
    except (ValueError, KeyError):
        names = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models))[:12])
        raise BackendError(f"--model {model}: not a torchvision classification model (for example: {names}, ...; "
                           "run-eval --list-models lists them)")
    source, why, _ = resolve_weights(model, weights)
    if source is None:
        _random_warning(model, why)
        torch.manual_seed(0)
        net = torchvision.models.get_model(model, weights=None, num_classes=num_classes)
        return net.eval(), "random"
    _load_into(net, source, model)
    return net.eval(), source


def build_timm(model: str, weights: Optional[str], num_classes: int = 1000) -> Tuple[nn.Module, str]:
    """A timm model (`timm:ARCH.TAG`) with weights from --weights, the Hub cache, a download, or random."""
    from engine.config import ConfigError
    from engine.models.catalog import import_timm, timm_name, timm_pretrained_cfg

    try:
        timm = import_timm()
        name, _ = timm_pretrained_cfg(timm_name(model))
    except ConfigError as e:
        raise BackendError(str(e)) from None
    source, why, _ = resolve_weights(model, weights)
    if source is None:
        _random_warning(model, why)
        torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if source is None:
        return net.eval(), "random"
    _load_into(net, source, model)
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


def model_name(config: RunConfig) -> str:
    """What the report calls the model: the TorchScript file as given with --ts, else --model
    (with --ts, --model only picks the preprocessing preset)."""
    return config.model.ts if config.model.ts else config.model.name


def preprocessing_of(config: RunConfig) -> str:
    """Whose preprocessing a --ts run uses, for the report's title: the model the file's stored spec
    names, else --model's (assumed)."""
    from engine.models.catalog import read_file_spec

    stored = read_file_spec(config.model.ts) if config.model.ts else None
    return f"{stored['model']} (stored in the file)" if stored else config.model.name


def build_model(config: RunConfig) -> Tuple[nn.Module, dict]:
    """The model as the config names it; returns (eval-mode module, description for the report)."""
    from engine.models.catalog import is_timm, split_weights

    if config.model.ts:

        return load_torchscript(config.model.ts), {"model": model_name(config), "source": "torchscript", "ts": config.model.ts,
                                             "sha256": file_sha256(config.model.ts), "preset": preprocessing_of(config)}
    family = "timm" if is_timm(config.model.name) else "torchvision"
    build = build_timm if family == "timm" else build_torchvision
    net, source = build(config.model.name, config.model.weights, config.data.num_classes)
    info = {"model": config.model.name, "source": family, "weights": source}
    tag = split_weights(config.model.weights)[0] if config.model.weights else None
    if tag:
        info["tag"] = tag
    if source != "random":
        info["sha256"] = file_sha256(source)
    return net, info


def weights_sha256(model: str, weights: Optional[str]) -> Optional[str]:
    """sha256 of the file `--weights` stands for: the file given, or a tag's file (resolved through
    torchvision's cache or a download, engine.models.zoo.resolve_weights); None for none or no file."""
    if not weights:
        return None
    from engine.models.catalog import split_weights

    tag, path = split_weights(weights)
    if path is None:
        path = resolve_weights(model, weights)[0]
    return file_sha256(path) if path and os.path.isfile(path) else None

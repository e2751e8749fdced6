"""Backends by name. Accelerator libraries are imported inside the backend that needs them, so
this package imports on a machine without them."""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, Tuple

from engine.backends.base import Backend, BackendError, InFlight
from engine.config import RunConfig

# name -> (module, class)
REGISTRY: Dict[str, Tuple[str, str]] = {
    "cpu": ("engine.backends.cpu", "CpuBackend"),
    "sim": ("engine.backends.sim", "SimBackend"),
    "cuda": ("engine.backends.cuda", "CudaBackend"),
    "aie": ("engine.backends.aie", "AieBackend"),
    "npu": ("engine.backends.npu", "NpuBackend"),
}

__all__ = ["Backend", "BackendError", "InFlight", "REGISTRY", "create_backend", "resolve_auto"]


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# the order of `--backend auto`
AUTO_ORDER: Tuple[Tuple[str, Callable[[], bool]], ...] = (
    ("aie", lambda: _importable("torch_aie")),
    ("npu", lambda: _importable("torch_npu")),
    ("cuda", _cuda_available),
)


def resolve_auto(verbose: bool = True) -> str:
    """aie if torch_aie imports, else npu, else cuda, else cpu; the choice is printed."""
    for name, available in AUTO_ORDER:
        if available():
            choice = name
            break
    else:
        choice = "cpu"
    if verbose:
        print(f"--backend auto: using {choice}", file=sys.stderr)
    return choice


def create_backend(config: RunConfig) -> Backend:
    name = config.backend
    if name == "auto":
        name = resolve_auto()
        config = config.replace(backend=name)
    if name not in REGISTRY:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise BackendError(f"backend {name!r} is not available: {e}")
    return getattr(mod, cls)(config)

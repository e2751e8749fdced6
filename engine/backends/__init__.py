"""Backends by name. Accelerator libraries are imported inside the backend that needs them, so
this package imports on a machine without them."""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, Optional, Tuple

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

__all__ = ["Backend", "BackendError", "InFlight", "REGISTRY", "auto_choice", "create_backend", "resolve_auto"]


def _importable(name: str) -> Optional[str]:
    """Why `name` counts as present ("torch_aie 7.0 imports"), or None when it does not import."""
    try:
        mod = importlib.import_module(name)
    except Exception:
        return None
    version = getattr(mod, "__version__", None)
    return f"{name} {version} imports" if version else f"{name} imports"


def _cuda_available() -> Optional[str]:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return f"CUDA device 0 is {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible)"
    except Exception:
        return None


# the order of `--backend auto`: each test returns why it applies, or None
AUTO_ORDER: Tuple[Tuple[str, Callable[[], Optional[str]]], ...] = (
    ("aie", lambda: _importable("torch_aie")),
    ("npu", lambda: _importable("torch_npu")),
    ("cuda", _cuda_available),
)


def auto_choice() -> Tuple[str, str]:
    """(backend, reason) for `--backend auto`: aie if torch_aie imports, else npu if torch_npu
    imports, else cuda if torch sees a CUDA device, else cpu."""
    for name, why in AUTO_ORDER:
        reason = why()
        if reason:
            return name, reason
    return "cpu", "no torch_aie, no torch_npu, no CUDA device"


def resolve_auto(verbose: bool = True) -> str:
    """The backend `--backend auto` picks; with `verbose`, the choice and its reason on stderr."""
    choice, reason = auto_choice()
    if verbose:
        print(f"--backend auto: using {choice} ({reason})", file=sys.stderr)
    return choice


def create_backend(config: RunConfig) -> Backend:
    name, reason = config.backend.name, None
    if name == "auto":
        name, reason = auto_choice()
        print(f"--backend auto: using {name} ({reason})", file=sys.stderr)
        config = config.replace(backend=name)
    if name not in REGISTRY:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    if config.backend.precision == "auto":
        from engine.config import default_precision

        config = config.replace(precision=default_precision(name))
    module, cls = REGISTRY[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise BackendError(f"backend {name!r} is not available: {e}")
    backend = getattr(mod, cls)(config)
    backend.auto_reason = reason  # the report says why auto chose it
    return backend

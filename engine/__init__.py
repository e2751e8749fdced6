"""Exact ImageNet evaluation and bulk scoring: a shared-memory decode pool feeding an
asyncio scheduler that overlaps host-to-device copies with model execution.

Importing this package does not import torch: backends import their libraries lazily.
"""

__version__ = "0.1.0"

from engine.config import PreprocessSpec, RunConfig, preset_for, resolve_config  # noqa: E402
from engine.errors import EngineError, RunError, UsageError  # noqa: E402
from engine.pipeline.dataset import Dataset, build_dataset  # noqa: E402
from engine.report.metrics import Metrics  # noqa: E402

__all__ = [
    "__version__",
    "Dataset",
    "EngineError",
    "Metrics",
    "PreprocessSpec",
    "RunConfig",
    "RunError",
    "Session",
    "UsageError",
    "build_dataset",
    "preset_for",
    "resolve_config",
    "run_eval",
]


def run_eval(config):
    """Run an accuracy evaluation described by a `RunConfig`; returns the report dict."""
    from engine.evaluate import run_eval as _run_eval

    return _run_eval(config)


def __getattr__(name):
    """`engine.Session` without importing the pipeline (and its numpy/asyncio set-up) at `import engine`."""
    if name == "Session":
        from engine.pipeline.session import Session

        return Session
    raise AttributeError(f"module 'engine' has no attribute {name!r}")

"""`export`: a torchvision or timm model's weights -> TorchScript, the replacement for `ResNeXt50_pth2ts.py`.

Builds the model, loads the state dict strictly (a clear error for a wrong architecture or a
file that is not a state dict), traces it with a 1x3xSxS batch (S: the declared crop, 224 for
ResNeXt-50 V1), checks the traced module against eager on a different random batch, and saves it
with the preprocessing the weights declare (and the model, tag, published figures) as an extra
file in the archive (engine/models/catalog.py). The result is what `run-eval --ts`, `make-cache
--ts` and the aie backend's compile take.
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional

from engine.errors import EXIT_ERROR, EXIT_OK, UsageError


def export_torchscript(weights: str, out: str, model: str = "resnext50_32x4d", num_classes: int = 1000,
                       size: Optional[int] = None, check_batch: int = 2, atol: float = 1e-4, rtol: float = 1e-4,
                       seed: int = 0, timm_size: str = "test") -> dict:
    """Write the traced model to `out`, with the preprocessing its weights declare stored inside
    (engine/models/catalog.py: EXTRA_FILE); returns what was checked. Raises BackendError / ExportError
    / ConfigError."""
    import json

    import torch

    from engine.models.catalog import EXTRA_FILE, is_timm, resolve, spec_to_json, split_weights
    from engine.models.zoo import build_timm, build_torchvision, quiet_jit, resolve_weights

    tag, path = split_weights(weights)
    if path is None:  # a tag: its file from torchvision's cache or a download, never random weights
        path, why, _ = resolve_weights(model, weights)
        if path is None:
            raise ExportError(f"{weights}: no file for this tag ({why}); give the state dict file")
    if not os.path.isfile(path):
        raise ExportError(f"{path}: no such file")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ExportError(f"{out}: folder {parent} does not exist")
    entry = resolve(model, weights, None, timm_size)  # ConfigError for an unknown tag or timm name
    build = build_timm if is_timm(model) else build_torchvision
    net, _ = build(model, path, num_classes)  # BackendError on a bad file / architecture
    net.eval()
    size = size or entry.spec.crop
    stored = spec_to_json(entry, entry.spec)
    stored["input"] = [1, 3, size, size]
    with quiet_jit():
        with torch.no_grad():
            traced = torch.jit.trace(net, torch.zeros(1, 3, size, size), check_trace=False)
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(check_batch, 3, size, size, generator=gen)
            eager, got = net(x), traced(x)
        diff = float((eager - got).abs().max())
        if not torch.allclose(eager, got, atol=atol, rtol=rtol):
            raise TraceMismatchError(f"the traced model differs from eager by up to {diff:.3g} on a random "
                              f"{tuple(x.shape)} batch (atol {atol}, rtol {rtol}); not saved")
        tmp = out + ".partial.ts"
        try:
            torch.jit.save(traced, tmp, _extra_files={EXTRA_FILE: json.dumps(stored, sort_keys=True)})
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return {"model": entry.model, "weights": path, "tag": entry.tag, "out": out, "input": [1, 3, size, size],
            "checked_batch": check_batch, "max_abs_diff": diff, "preprocess": stored["preprocess"],
            "declared_by": entry.source}


class ExportError(UsageError):
    """The export cannot go on; the message says why."""


class TraceMismatchError(ExportError):
    """The traced module does not reproduce the eager model (exit status 3: the file was not written)."""

    exit_status = EXIT_ERROR


MismatchError = TraceMismatchError  # its name before run-score's own mismatch got one of its own


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export", allow_abbrev=False,
        description="Export a torchvision or timm model to TorchScript (traced with a 1x3xSxS batch), checked "
                    "against eager, with the preprocessing its weights declare stored inside; the file run-eval "
                    "--ts, make-cache --ts and the aie backend take.")
    p.add_argument("weights", metavar="WEIGHTS",
                   help="state dict or safetensors file (like resnext50_32x4d-7cdf4587.pth), a torchvision weights "
                        "tag (IMAGENET1K_V2: its file from torchvision's cache or a download), or TAG=FILE")
    p.add_argument("out", metavar="OUT.ts", help="TorchScript file to write")
    p.add_argument("--model", default="resnext50_32x4d",
                   help="torchvision model name or timm:ARCH.TAG (default: %(default)s)")
    p.add_argument("--timm-input-size", choices=("test", "train"), default="test",
                   help="timm models: store timm's test-size preprocessing (validate.py's) or its train size "
                        "(default: test)")
    p.add_argument("--num-classes", type=int, default=1000, help="(default: %(default)s)")
    p.add_argument("--size", type=int, default=None,
                   help="input height and width to trace with (default: the declared crop, 224 for most)")
    p.add_argument("--atol", type=float, default=1e-4, help="traced-vs-eager tolerance (default: %(default)s)")
    return p


def export_main(argv: Optional[List[str]] = None) -> int:
    from engine.commands import main

    return main("export", _export_command, argv)


def _export_command(argv: Optional[List[str]]) -> int:
    a = export_parser().parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise ExportError(f"needs torch and torchvision ({e}); run it with the venv's python") from None
    from engine.backends.base import BackendError
    from engine.config import ConfigError

    try:
        info = export_torchscript(a.weights, a.out, a.model, a.num_classes, a.size, atol=a.atol, rtol=a.atol,
                                  timm_size=a.timm_input_size)
    except (BackendError, ExportError, ConfigError) as e:  # one line: a wrong state dict's message lists every key
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise (TraceMismatchError if isinstance(e, TraceMismatchError) else ExportError)(first[:500]) from None
    print(f"export: {info['model']} from {info['weights']} -> {info['out']} "
          f"(traced with {tuple(info['input'])}; traced == eager within {a.atol}, max diff {info['max_abs_diff']:.2g})")
    p = info["preprocess"]
    print(f"export: stored its preprocessing: resize {p['resize']} crop {p['crop']} {p['interpolation']} "
          f"mean {p['mean']} std {p['std']} (from {info['declared_by']})")
    return EXIT_OK

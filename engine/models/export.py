"""`export`: a torchvision state dict -> TorchScript, the replacement for `ResNeXt50_pth2ts.py`.

Builds the torchvision model, loads the state dict strictly (a clear error for a wrong
architecture or a file that is not a state dict), traces it with a 1x3xSxS batch (S: the model
preset's crop, 224 for ResNeXt-50), checks the traced module against eager on a different random
batch, and saves. The result is what `run-eval --ts` and the aie backend's compile take.
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional

from engine.errors import EXIT_ERROR, EXIT_OK, UsageError


def export_torchscript(weights: str, out: str, model: str = "resnext50_32x4d", num_classes: int = 1000,
                       size: Optional[int] = None, check_batch: int = 2, atol: float = 1e-4, rtol: float = 1e-4,
                       seed: int = 0) -> dict:
    """Write the traced model to `out`; returns what was checked. Raises BackendError / ExportError."""
    import torch

    from engine.config import preset_for
    from engine.models.zoo import build_torchvision, quiet_jit

    if not os.path.isfile(weights):
        raise ExportError(f"{weights}: no such file")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ExportError(f"{out}: folder {parent} does not exist")
    net, _ = build_torchvision(model, weights, num_classes)  # BackendError on a bad file / architecture
    net.eval()
    size = size or preset_for(model).crop
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
            traced.save(tmp)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return {"model": model, "weights": weights, "out": out, "input": [1, 3, size, size],
            "checked_batch": check_batch, "max_abs_diff": diff}


class ExportError(UsageError):
    """The export cannot go on; the message says why."""


class TraceMismatchError(ExportError):
    """The traced module does not reproduce the eager model (exit status 3: the file was not written)."""

    exit_status = EXIT_ERROR


MismatchError = TraceMismatchError  # its name before run-score's own mismatch got one of its own


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export", allow_abbrev=False,
        description="Export a torchvision state dict to TorchScript (traced with a 1x3xSxS batch), checked "
                    "against eager; the file run-eval --ts and the aie backend take.")
    p.add_argument("weights", metavar="WEIGHTS.pth", help="state dict, like resnext50_32x4d-7cdf4587.pth")
    p.add_argument("out", metavar="OUT.ts", help="TorchScript file to write")
    p.add_argument("--model", default="resnext50_32x4d", help="torchvision model name (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=1000, help="(default: %(default)s)")
    p.add_argument("--size", type=int, default=None,
                   help="input height and width to trace with (default: the model preset's crop, 224)")
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

    try:
        info = export_torchscript(a.weights, a.out, a.model, a.num_classes, a.size, atol=a.atol, rtol=a.atol)
    except (BackendError, ExportError) as e:  # one line: a wrong state dict's message lists every key
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise (TraceMismatchError if isinstance(e, TraceMismatchError) else ExportError)(first[:500]) from None
    print(f"export: {info['model']} from {info['weights']} -> {info['out']} "
          f"(traced with {tuple(info['input'])}; traced == eager within {a.atol}, max diff {info['max_abs_diff']:.2g})")
    return EXIT_OK

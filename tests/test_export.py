"""`bin/export`: state dict -> TorchScript, checked against eager, and the round trip through run-eval."""

from __future__ import annotations

import io
import os

import pytest
import torch

from engine.backends.base import BackendError
from engine.config import resolve_config
from engine.models.export import ExportError, export_main, export_torchscript
from engine.models.zoo import load_torchscript

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"resize": 64, "crop": 56}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A seeded random resnet18 state dict (no download: resnet18 keeps the CPU time small)."""
    import torchvision

    torch.manual_seed(1234)
    path = str(tmp_path_factory.mktemp("export") / "resnet18-random.pth")
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def exported(weights):
    out = os.path.join(os.path.dirname(weights), "resnet18.ts")
    info = export_torchscript(weights, out, model="resnet18")
    return out, info


def test_export_traces_and_matches_eager(exported, weights):
    out, info = exported
    assert os.path.isfile(out) and not os.path.exists(out + ".partial.ts")
    assert info["input"] == [1, 3, 224, 224] and info["max_abs_diff"] <= 1e-4
    import torchvision

    net = torchvision.models.resnet18()
    net.load_state_dict(torch.load(weights, weights_only=True))
    net.eval()
    ts = load_torchscript(out)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(5))  # another batch size too
    with torch.no_grad():
        assert torch.allclose(ts(x), net(x), atol=1e-4, rtol=1e-4)


def test_run_eval_on_the_exported_file_gives_the_same_counts(exported, weights, folder_set):
    """`run-eval --ts exported.ts` == `run-eval --model resnet18 --weights w.pth`, image for image."""
    from engine.evaluate import run_eval

    # a 56-pixel crop keeps the CPU time small; the traced graph (adaptive pooling) takes any size
    common = dict(data=folder_set, limit=40, backend="cpu", precision="fp32", batch_size=8, workers=2,
                  progress=False, compute_only_iters=1)
    via_ts, s1 = run_eval(resolve_config("resnet18", SMALL, ts=exported[0], **common), out=io.StringIO())
    via_sd, s2 = run_eval(resolve_config("resnet18", SMALL, weights=weights, **common), out=io.StringIO())
    assert s1 == s2 == 0
    assert via_ts["images"] == via_sd["images"] == 40
    assert (via_ts["correct_top1"], via_ts["correct_top5"]) == (via_sd["correct_top1"], via_sd["correct_top5"])
    assert via_ts["per_class"] == via_sd["per_class"]
    assert via_ts["backend"]["source"] == "torchscript" and via_sd["backend"]["source"] == "torchvision"


def test_wrong_architecture_and_corrupt_file_are_clear(weights, tmp_path):
    with pytest.raises(BackendError, match="does not fit --model resnet34"):
        export_torchscript(weights, str(tmp_path / "x.ts"), model="resnet34")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a state dict")
    with pytest.raises(BackendError, match="not a readable PyTorch state dict"):
        export_torchscript(str(bad), str(tmp_path / "x.ts"), model="resnet18")
    with pytest.raises(ExportError, match="no such file"):
        export_torchscript(str(tmp_path / "missing.pth"), str(tmp_path / "x.ts"))
    with pytest.raises(ExportError, match="does not exist"):
        export_torchscript(weights, str(tmp_path / "nodir" / "x.ts"), model="resnet18")
    assert not os.path.exists(tmp_path / "x.ts")


def test_cli_exit_statuses_and_one_line_errors(weights, tmp_path, capsys):
    assert export_main([weights, str(tmp_path / "y.ts"), "--model", "resnet34"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export: error: --weights") and "does not fit" in err[0]
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage")
    assert export_main([str(bad), str(tmp_path / "y.ts"), "--model", "resnet18"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

"""The defaults a newcomer gets: --backend auto (with its reason, printed and reported), --workers
auto on run-eval, and reports that name the model that ran (--ts)."""

from __future__ import annotations

import json
import os

import pytest

from conftest import ROOT, run_cli

EVAL = os.path.join(ROOT, "bin", "run-eval")


def test_parsers_default_to_auto():
    from engine.cli import eval_parser

    a = eval_parser().parse_args(["--data", "x"])
    assert a.backend == "auto"
    assert a.workers == 0  # "auto": engine.pipeline.autotune measures before the run
    assert eval_parser().parse_args(["--data", "x", "--workers", "3"]).workers == 3


def test_auto_order_and_reasons(monkeypatch):
    import engine.backends as b

    present = {"aie": None, "npu": None, "cuda": None}
    monkeypatch.setattr(b, "AUTO_ORDER", tuple((k, (lambda k=k: present[k])) for k in ("aie", "npu", "cuda")))
    assert b.auto_choice() == ("cpu", "no torch_aie, no torch_npu, no CUDA device")
    present["cuda"] = "CUDA device 0 is X"
    assert b.auto_choice() == ("cuda", "CUDA device 0 is X")
    present["npu"] = "torch_npu imports"
    assert b.auto_choice()[0] == "npu"
    present["aie"] = "torch_aie 7.0 imports"
    assert b.auto_choice() == ("aie", "torch_aie 7.0 imports")


def test_importable_names_the_version():
    from engine.backends import _importable

    assert _importable("no_such_module_here") is None
    assert _importable("abc") == "abc imports"
    assert _importable("json").startswith("json 2.")  # json has a __version__


def test_run_eval_defaults_print_and_report_the_choices(folder_set, tmp_path):
    """No --backend, no --workers: auto picks cpu here (no accelerator libraries), says why on
    stderr and in the JSON; --workers auto is measured and reported."""
    out = tmp_path / "r.json"
    r = run_cli([EVAL, "--data", folder_set, "--limit", "24", "--batch-size", "8", "--model", "mobilenet_v3_small",
                 "--json", str(out), "--no-progress"])
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    if rep["backend"]["backend"] == "cuda":
        pytest.skip("this machine has a CUDA device: auto picked it")
    assert rep["backend"]["backend"] == "cpu"
    assert "--backend auto: using cpu (no torch_aie, no torch_npu, no CUDA device)" in r.stderr
    assert rep["backend"]["auto"] == "no torch_aie, no torch_npu, no CUDA device"
    assert rep["autotune"]["workers"]["value"] >= 1 and rep["autotune"]["workers"]["reason"]
    assert rep["config"]["pipeline"]["workers"] == rep["autotune"]["workers"]["value"]
    assert rep["images"] == 24


def test_ts_model_is_named_by_its_file(folder_set, tmp_path):
    """With --ts, the title and the JSON call the model by that file, not by the default --model."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class Tiny(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)).repeat(1, 334)[:, :1000]

    ts = tmp_path / "tiny-model.ts"
    torch.jit.script(Tiny()).save(str(ts))
    out = tmp_path / "r.json"
    r = run_cli([EVAL, "--data", folder_set, "--limit", "16", "--batch-size", "8", "--backend", "cpu",
                 "--workers", "1", "--ts", str(ts), "--json", str(out), "--no-progress"])
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["model"] == str(ts) and rep["backend"]["model"] == str(ts)
    title = r.stdout.splitlines()[0]
    assert f"ImageNet evaluation: {ts} (TorchScript, preprocessing of resnext50_32x4d)" in title
    assert "resnext50_32x4d (" not in title

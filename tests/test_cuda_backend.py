"""The cuda backend (and StreamBackend, which npu shares).

On a machine without CUDA the stream/event logic still runs: `CpuMirror` is StreamBackend with a
fake device module whose streams and events are no-ops and whose "device" is the CPU, so
submit -> copied -> result, staging buffers, ring registration and padding for graphs are
exercised through the real pipeline. The GPU tests run only where torch.cuda is available.
"""

from __future__ import annotations

import contextlib
import io
import os
import types

import numpy as np
import pytest
import torch

from engine.backends.base import BackendError
from engine.backends.cuda import CudaBackend, StreamBackend
from engine.config import resolve_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = 32
HAS_CUDA = torch.cuda.is_available()


def tiny_ts(path: str) -> str:
    import warnings

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 1000)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(net, torch.zeros(1, 3, SIDE, SIDE)).save(path)
    return path


class _Stream:
    def __init__(self, device=None):
        self.waited = 0

    def wait_event(self, event):
        assert event.recorded, "waiting on an event that was never recorded"
        self.waited += 1

    def synchronize(self):
        pass


class _Event:
    made = []

    def __init__(self, **kw):
        assert kw.get("blocking") is True, "events must block (not spin) so workers keep their cores"
        self.recorded = False
        self.synced = False
        _Event.made.append(self)

    def record(self, stream=None):
        self.recorded = True

    def synchronize(self):
        assert self.recorded
        self.synced = True


FAKE_DM = types.SimpleNamespace(
    is_available=lambda: True, device_count=lambda: 1, set_device=lambda d: None, Stream=_Stream, Event=_Event,
    stream=lambda s: contextlib.nullcontext(), synchronize=lambda: None, get_device_name=lambda d: "cpu mirror")


class CpuMirror(StreamBackend):
    """StreamBackend on the CPU: the cuda code path with the device calls stubbed."""

    name = "cuda"
    device_type = "cpu"
    supports_graphs = False
    register_ok = True
    calls: list = []

    def _device_module(self):
        return FAKE_DM

    def _host_register(self, ptr, size):
        CpuMirror.calls.append(("register", ptr, size))
        return self.register_ok

    def _host_unregister(self, ptr):
        CpuMirror.calls.append(("unregister", ptr))

    def _pinned_empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype)

    def _record_stream(self, t, stream):
        pass

    def _tune(self):
        pass


class StagingMirror(CpuMirror):
    register_ok = False


@pytest.fixture(scope="module")
def model_ts(tmp_path_factory):
    return tiny_ts(str(tmp_path_factory.mktemp("cuda") / "tiny.ts"))


def _cfg(ts, data=None, **kw):
    base = dict(ts=ts, backend="cuda", precision="fp32", batch_size=16, workers=2, progress=False,
                compute_only_iters=1, data=data)
    base.update(kw)
    return resolve_config("tiny", {"resize": SIDE, "crop": SIDE}, **base)


def _eval(monkeypatch, cfg, cls):
    import engine.evaluate as ev
    import engine.pipeline.session as session

    if cls is not None:  # the Session creates the run's backend
        monkeypatch.setattr(session, "create_backend", lambda c: cls(c))
    report, status = ev.run_eval(cfg, out=io.StringIO())
    return report, status


@pytest.mark.parametrize("cls", [CpuMirror, StagingMirror])
def test_stream_backend_logic_gives_the_cpu_counts(monkeypatch, folder_set, model_ts, cls):
    """Copy stream -> event -> compute stream -> pinned D2H -> event, through run_eval: every image
    counted once, the cpu backend's counts; the ring registered then unregistered (or staged)."""
    CpuMirror.calls.clear()
    _Event.made.clear()
    ref, _ = _eval(monkeypatch, _cfg(model_ts, folder_set, backend="cpu"), None)
    got, status = _eval(monkeypatch, _cfg(model_ts, folder_set), cls)
    assert status == 0 and got["images"] == ref["images"] == 120 and got["failed"] == 0
    assert (got["correct_top1"], got["correct_top5"]) == (ref["correct_top1"], ref["correct_top5"])
    assert all(e.synced for e in _Event.made), "an event nobody waited for"
    kinds = [c[0] for c in CpuMirror.calls]
    if cls is CpuMirror:
        assert kinds == ["register", "unregister"], kinds
        assert CpuMirror.calls[0][1] == CpuMirror.calls[1][1]
    else:  # registration refused: nothing to unregister, batches staged
        assert kinds == ["register"], kinds
    assert got["backend"]["host_memory"] == ("registered ring" if cls is CpuMirror else "pinned staging")


def test_stream_backend_direct_submit_and_compute_only(model_ts):
    b = CpuMirror(_cfg(model_ts))
    b.prepare(8)
    px = np.random.default_rng(0).integers(0, 256, (5, SIDE, SIDE, 3), dtype=np.uint8)
    job = b.submit(px)  # not registered: staged
    job.copied()
    logits = job.result()
    assert logits.shape == (5, 1000) and logits.dtype == np.float32
    x = torch.from_numpy(px).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    from engine.models.zoo import load_torchscript

    with torch.no_grad():
        ref = load_torchscript(model_ts)(x).numpy()
    assert np.abs(logits - ref).max() < 1e-4
    lat = b.compute_only(8, 3, warmup=1)
    assert len(lat) == 3 and all(t > 0 for t in lat)
    with pytest.raises(BackendError, match="prepared for 1..8"):
        b.submit(np.zeros((9, SIDE, SIDE, 3), np.uint8))
    b.close()


def test_option_errors_are_clear(model_ts):
    with pytest.raises(BackendError, match="--shape static"):
        type("GraphMirror", (CpuMirror,), {"supports_graphs": True})(_cfg(model_ts, cuda_graphs=True, shape="dynamic"))
    with pytest.raises(BackendError, match="--cuda-graphs is for --backend cuda"):
        CpuMirror(_cfg(model_ts, cuda_graphs=True))  # the mirror, like npu, has no graphs
    from engine.backends.npu import NpuBackend

    with pytest.raises(BackendError, match="cuda-graphs is for --backend cuda, not npu"):
        NpuBackend(_cfg(model_ts, backend="npu", cuda_graphs=True))


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without CUDA")
def test_cuda_unavailable_is_one_clear_error(model_ts):
    with pytest.raises(BackendError, match="torch.cuda.is_available\\(\\) is False"):
        CudaBackend(_cfg(model_ts))


def test_npu_without_torch_npu_is_one_clear_error(model_ts):
    try:
        import torch_npu  # noqa: F401

        pytest.skip("torch_npu is installed")
    except ImportError:
        pass
    from engine.backends.npu import NpuBackend

    with pytest.raises(BackendError, match="needs torch_npu"):
        NpuBackend(_cfg(model_ts, backend="npu"))


def test_cli_reports_the_missing_device_in_one_line(folder_set, model_ts, capsys):
    if HAS_CUDA:
        pytest.skip("CUDA is available")
    from engine.cli import run_eval_main

    status = run_eval_main(["--data", folder_set, "--backend", "cuda", "--ts", model_ts, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 3 and err[-1].startswith("run-eval: error: --backend cuda:")


# ---- on a GPU -------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_eval_matches_cpu(monkeypatch, folder_set, model_ts, graphs):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 means fp32 for this comparison
    ref, _ = _eval(monkeypatch, _cfg(model_ts, folder_set, backend="cpu"), None)
    got, status = _eval(monkeypatch, _cfg(model_ts, folder_set, cuda_graphs=graphs, batch_size=32), None)
    assert status == 0 and got["images"] == 120  # 120 = 3 x 32 + 24: the last batch is short
    assert got["backend"]["host_memory"] == "registered ring"
    assert got["backend"]["graphs"] is graphs
    # fp32 on the GPU: other convolution algorithms, so allow one top-k tie to fall the other way
    assert abs(got["correct_top1"] - ref["correct_top1"]) <= 1
    assert abs(got["correct_top5"] - ref["correct_top5"]) <= 1


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_compute_only_is_synchronised(model_ts):
    b = CudaBackend(_cfg(model_ts, precision="fp16"))
    b.prepare(64)
    lat = b.compute_only(64, 5, warmup=2)
    assert len(lat) == 5 and min(lat) > 0
    b.close()

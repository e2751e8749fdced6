"""Pretrained weights for --model NAME: torchvision's cache, else a hash-checked download through
torchvision's URL, else random weights with a warning; and what the report calls the model."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading

import pytest

torch = pytest.importorskip("torch")

from engine.models import zoo  # noqa: E402


@pytest.fixture
def served(tmp_path):
    """A loopback HTTP server over tmp_path/www; yields (www dir, base url)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(www), **kw)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield www, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def _state_dict_file(www, stem: str, good_hash: bool = True) -> str:
    """A small state dict named like torchvision's files: STEM-<first 8 hex of its sha256>.pth."""
    tmp = www / "tmp.pth"
    torch.save({"w": torch.arange(6.0)}, str(tmp))
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    name = f"{stem}-{digest if good_hash else '00000000'}.pth"
    os.replace(str(tmp), str(www / name))
    return name


def _point_at(monkeypatch, tmp_path, url, tag="IMAGENET1K_V1"):
    """Serve `url` for weights `tag` of any model (another tag has no url)."""
    monkeypatch.setattr(zoo, "_weights_url", lambda model, t: url if t == tag else None)
    monkeypatch.setattr(zoo, "_download_failed", {})
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(zoo.NO_DOWNLOAD_ENV, raising=False)


def test_download_then_cache(served, tmp_path, monkeypatch):
    www, base = served
    name = _state_dict_file(www, "tiny")
    _point_at(monkeypatch, tmp_path, f"{base}/{name}")
    path, how = zoo.torchvision_weights("tiny")
    assert how == "downloaded" and path == str(tmp_path / "hub" / "checkpoints" / name)
    assert torch.load(path)["w"].tolist() == [0, 1, 2, 3, 4, 5]
    (www / name).unlink()  # the second call must not need the server
    assert zoo.torchvision_weights("tiny") == (path, "torchvision's cache")


def test_wrong_hash_leaves_no_file_and_falls_back(served, tmp_path, monkeypatch):
    www, base = served
    name = _state_dict_file(www, "tiny", good_hash=False)
    _point_at(monkeypatch, tmp_path, f"{base}/{name}")
    path, why = zoo.torchvision_weights("tiny")
    assert path is None and "does not start with 00000000" in why
    ckpt = tmp_path / "hub" / "checkpoints"
    assert not ckpt.exists() or os.listdir(str(ckpt)) == []  # no partial or bad file kept


def test_unreachable_and_no_download(tmp_path, monkeypatch, served):
    _, base = served
    _point_at(monkeypatch, tmp_path, f"{base}/missing-12345678.pth")
    path, why = zoo.torchvision_weights("tiny")
    assert path is None and "the download failed" in why and "404" in why
    monkeypatch.setattr(zoo, "_download_failed", {})
    monkeypatch.setenv(zoo.NO_DOWNLOAD_ENV, "1")
    path, why = zoo.torchvision_weights("tiny")
    assert path is None and zoo.NO_DOWNLOAD_ENV in why


def test_random_weights_say_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(zoo, "_warned", set())
    monkeypatch.setenv(zoo.NO_DOWNLOAD_ENV, "1")
    net, source = zoo.build_torchvision("resnet18", None)
    assert source == "random"
    err = capsys.readouterr().err
    assert "using random weights" in err and "not in torchvision's cache" in err


def test_model_name_is_the_ts_file():
    from engine.config import resolve_config

    cfg = resolve_config("resnext50_32x4d", backend="cpu", ts="models/effnet.ts")
    assert zoo.model_name(cfg) == "models/effnet.ts"
    assert zoo.model_name(cfg.replace(ts=None)) == "resnext50_32x4d"


def test_a_tag_downloads_its_own_file(served, tmp_path, monkeypatch):
    """--weights IMAGENET1K_V2 resolves to V2's file (cache, else download), not V1's."""
    www, base = served
    name = _state_dict_file(www, "tiny-v2")
    _point_at(monkeypatch, tmp_path, f"{base}/{name}", tag="IMAGENET1K_V2")
    path, how, tag = zoo.resolve_weights("tiny", "IMAGENET1K_V2")
    assert (how, tag) == ("downloaded", "IMAGENET1K_V2") and path.endswith(name)
    path1, why, tag1 = zoo.resolve_weights("tiny", None)  # the default tag: V1, which has no url here
    assert path1 is None and tag1 == "IMAGENET1K_V1" and "no IMAGENET1K_V1 weights" in why


def test_tag_file_and_its_sha_before_the_run(served, tmp_path, monkeypatch):
    """run-score's run.json and the aie identity see a tag's file by its sha256."""
    from engine.models.zoo import weights_sha256

    www, base = served
    name = _state_dict_file(www, "tiny-v2")
    _point_at(monkeypatch, tmp_path, f"{base}/{name}", tag="IMAGENET1K_V2")
    want = hashlib.sha256((www / name).read_bytes()).hexdigest()
    assert weights_sha256("tiny", "IMAGENET1K_V2") == want
    assert weights_sha256("tiny", None) is None

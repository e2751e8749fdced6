"""Fast mode's region decoder (preprocess/_jpegregion.c through preprocess/jpegregion.py).

Its windows hold the same library's full-decode pixels; its resize is Pillow-SIMD's bit for bit
(stock Pillow's within STOCK_MAX_DIFF = 2, see there), its vector and scalar passes the same; the files it refuses or warns
about go to Pillow (so fast mode fails exactly where exact mode fails); the rows below the window of
a whole file are not decoded, those of a file cut short are; it never hangs on the skip pattern that
hangs libjpeg-turbo 2.1.5; and the build/check command works.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from engine.synthetic import make_image
from preprocess import decode as dec
from preprocess import jpegregion

REGION = jpegregion.load()
try:  # the C resize is Pillow-SIMD's arithmetic: equal to it, within STOCK_MAX_DIFF of stock Pillow
    from importlib.metadata import version as _version

    PILLOW_SIMD = bool(_version("pillow-simd"))
except Exception:  # noqa: BLE001 -- PackageNotFoundError, or no importlib.metadata
    PILLOW_SIMD = False
# What the C resize (Pillow-SIMD's arithmetic, bit for bit) guarantees against stock Pillow: at most
# 2 apart per channel, 2 on very few pixels. Not a defect but the documented arithmetic difference
# (docs/compat.md): stock Pillow's weights are int32 with 22 fractional bits, Pillow-SIMD's int16
# with as many as fit (14 and more), and each of the two passes rounds to 8 bits. The horizontal
# pass can so leave a pixel 1 apart; the vertical pass weighs those differences by its weights,
# whose absolute values sum to 1 (box, bilinear) or more (the negative lobes of bicubic and
# lanczos), and rounds again: 1 + 1 at worst. Seen with stock Pillow 11.3 (the newest for Python
# 3.9; issue 14): 2 on a few values with bicubic and lanczos upscaling; with box, one geometry
# (602x626 -> 103x363) has 8 % of its values 1 apart, all one way (the C value 1 lower), while on
# the same bytes Pillow-SIMD 12.1 and the C resize agree bit for bit.
STOCK_MAX_DIFF = 2
STOCK_MAX_2S = 0.002  # the fraction of channel values 2 apart stays below this


def _assert_stock_close(a, b, frac, msg=""):
    """``a`` (the C resize) against ``b`` (stock Pillow's): see STOCK_MAX_DIFF."""
    d = np.abs(a.astype(np.int16) - b)
    assert d.max() <= STOCK_MAX_DIFF and (d > 0).mean() < frac and (d > 1).mean() < STOCK_MAX_2S, (
        f"{msg}: max {d.max()}, {(d > 0).mean():.4f} differ, {(d > 1).mean():.5f} by 2+ (allowed: "
        f"max {STOCK_MAX_DIFF}, {frac}, {STOCK_MAX_2S}); if the C resize changed, it must stay "
        "Pillow-SIMD's arithmetic (make test, with pillow-simd, checks it bit for bit)")
needs_region = pytest.mark.skipif(REGION is None, reason=f"region decoder not built: {jpegregion.status()}")


def _jpeg(width, height, seed=0, gray=False, **kw):
    img = make_image(np.random.default_rng([5, seed, width, height]), width, height, label=seed % 1000)
    if gray:
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _window(data, denom, flags, win):
    out = np.zeros(jpegregion.window_bytes(win[2], win[3]), np.uint8)
    x, width, y, rows, sw, sh = REGION.decode(data, denom, flags, win, out)
    return (x, width, y, rows, sw, sh), out[: width * rows * 4].reshape(rows, width, 4)[:, :, :3]


@needs_region
@pytest.mark.parametrize("subsampling", [0, 1, 2])
@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("flags", [0, jpegregion.FASTDCT | jpegregion.FASTUPSAMPLE, jpegregion.FASTUPSAMPLE])
def test_windows_hold_the_full_decode_pixels(subsampling, progressive, flags):
    """Inside every window, at every DCT scale: the library's own full decode, bit for bit (the
    first and last column of a window cut inside the image may differ: fancy upsampling sees no
    neighbour there, which is why fast mode asks for a margin)."""
    rng = np.random.default_rng([subsampling, progressive, flags])
    checked = 0
    for trial in range(10):
        w_img, h_img = int(rng.integers(17, 700)), int(rng.integers(17, 700))
        data = _jpeg(w_img, h_img, trial, gray=trial == 3, quality=int(rng.integers(60, 98)),
                     subsampling=subsampling, progressive=progressive)
        for denom in (1, 2, 4, 8):
            (_, _, _, _, sw, sh), full = _window(data, denom, flags, (0, 0, -(-w_img // denom), -(-h_img // denom)))
            assert (sw, sh) == (-(-w_img // denom), -(-h_img // denom))
            for _ in range(4):
                x0, y0 = int(rng.integers(0, sw)), int(rng.integers(0, sh))
                w, h = int(rng.integers(1, sw - x0 + 1)), int(rng.integers(1, sh - y0 + 1))
                (x, width, y, rows, _, _), win = _window(data, denom, flags, (x0, y0, w, h))
                assert x <= x0 and x + width >= x0 + w and y <= y0 and y0 + h <= y + rows <= sh
                lo = 1 if x > 0 else 0
                hi = width - 1 if x + width < sw else width
                np.testing.assert_array_equal(win[:, lo:hi], full[y : y + rows, x + lo : x + hi])
                checked += 1
    assert checked == 10 * 4 * 4


@needs_region
def test_odd_skip_with_merged_upsampling_does_not_hang():
    """libjpeg-turbo 2.1.5 loops forever reading after a skip of an odd number of rows with merged
    (non-fancy) upsampling; the decoder skips whole iMCU rows only. Run in a child with a timeout."""
    code = (
        "import io, numpy as np; from PIL import Image; from engine.synthetic import make_image; "
        "from preprocess import jpegregion as j; r = j.load(); "
        "img = make_image(np.random.default_rng(0), 271, 320, 3); b = io.BytesIO(); "
        "img.save(b, 'JPEG', quality=90, subsampling=2, progressive=True); d = b.getvalue(); "
        "[r.decode(d, 1, j.FASTUPSAMPLE | f, (12, y, 247, 200), np.zeros(j.window_bytes(247, 200), np.uint8)) "
        " for f in (0, j.FASTDCT) for y in (1, 37, 63, 99)]; print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@needs_region
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "lanczos", "box", "hamming"])
@pytest.mark.parametrize("size", [(500, 375), (375, 500), (341, 256), (1200, 900), (2000, 60), (200, 150)])
def test_resize_in_c_is_pillows(interpolation, size, monkeypatch):
    """The one-call path (window + resize in C) against the window decoded alone and resized by
    Pillow: the same with Pillow-SIMD (its int16 weights), within STOCK_MAX_DIFF of stock Pillow."""
    data = _jpeg(*size, seed=size[0], quality=90)
    done = []
    real = REGION.fast_crop
    monkeypatch.setattr(REGION, "fast_crop", lambda *a, **k: done.append(real(*a, **k)) or done[-1])
    a = np.zeros((224, 224, 3), np.uint8)
    b = np.full((224, 224, 4), 9, np.uint8)[:, :, :3]  # not packed RGB: the Pillow-resize path
    dec.preprocess_into(data, a, 256, interpolation, "fast")
    assert len(done) == 1  # the one call ran and returned (no fallback to Pillow)
    dec.preprocess_into(data, b, 256, interpolation, "fast")
    assert len(done) == 1
    if PILLOW_SIMD:
        np.testing.assert_array_equal(a, b)
    _assert_stock_close(a, b, 0.03, f"{interpolation} {size}")  # lanczos: ~1 % differ


@needs_region
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "lanczos", "box"])
def test_one_call_geometry_is_pythons(interpolation, monkeypatch):
    """ie_fast_crop computes the resize, crop, DCT scale and window in C: the same as the Python
    path (preprocess/geometry.py, _dct_scale, _crop_window), which fast mode takes for an ``out``
    whose pixels are not packed, over random sizes, resize specs (shorter side or an exact pair),
    crops larger and smaller than the image, and every DCT scale. Equal pixels with Pillow-SIMD
    (whose resize the C code computes), within STOCK_MAX_DIFF of stock Pillow; a geometry slip would
    move the crop by whole pixels."""
    rng = np.random.default_rng([21, len(interpolation)])
    calls = []
    real = REGION.fast_crop
    monkeypatch.setattr(REGION, "fast_crop", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    for trial in range(40):
        w, h = int(rng.integers(8, 2600)), int(rng.integers(8, 2000))
        resize = int(rng.integers(16, 400)) if trial % 3 else (int(rng.integers(16, 400)), int(rng.integers(16, 400)))
        crop = (int(rng.integers(1, 330)), int(rng.integers(1, 330)))
        data = _jpeg(w, h, trial, quality=int(rng.integers(70, 97)), subsampling=trial % 3)
        a = np.full(crop + (3,), 7, np.uint8)
        dec.preprocess_into(data, a, resize, interpolation, "fast")
        b = np.full(crop + (4,), 9, np.uint8)[:, :, :3]  # not packed: the Python geometry
        dec.preprocess_into(data, b, resize, interpolation, "fast")
        msg = f"{w}x{h} resize {resize} crop {crop}"
        if PILLOW_SIMD:
            np.testing.assert_array_equal(a, b, err_msg=msg)
        _assert_stock_close(a, b, 0.10 if interpolation == "box" else 0.05, msg)  # box: see STOCK_MAX_DIFF
    assert len(calls) >= 40


@needs_region
def test_one_call_limits_and_refusals_go_to_python(monkeypatch):
    """What the one call refuses takes Python's path, which gives exact mode's reasons: a resize
    whose output is a decompression bomb, an image over the pixel limit, a CMYK file."""
    data = _jpeg(2000, 40, 1)
    out = np.zeros((224, 224, 3), np.uint8)
    with pytest.raises(dec.DecodeError, match="decompression bomb: resize"):
        dec.preprocess_into(data, out, 256, "bilinear", "fast", max_pixels=100_000)
    with pytest.raises(dec.DecodeError, match="decompression bomb"):
        dec.preprocess_into(_jpeg(500, 375, 2), out, 256, "bilinear", "fast", max_pixels=1000)
    cmyk = io.BytesIO()
    Image.new("CMYK", (300, 200), (10, 200, 30, 40)).save(cmyk, "JPEG")
    with pytest.raises(ValueError):
        REGION.fast_crop(cmyk.getvalue(), out, 256, Image.BILINEAR, 0, 0, -1, np.zeros(1 << 20, np.uint8))
    dec.preprocess_into(cmyk.getvalue(), out, 256, "bilinear", "fast")  # Pillow decodes it
    ref = np.zeros((224, 224, 3), np.uint8)
    dec.preprocess_into(cmyk.getvalue(), ref, 256, "bilinear", "exact")
    assert np.abs(out.astype(int) - ref).max() <= 1
    small = np.zeros(100, np.uint8)  # too small a work buffer: asked for the size needed, then called again
    asked = []
    REGION.fast_crop(_jpeg(500, 375, 3), out, 256, Image.BILINEAR, 0, 0, -1, small,
                     lambda n: asked.append(n) or np.zeros(n, np.uint8))
    assert len(asked) == 1 and asked[0] > 100
    with pytest.raises(ValueError, match="work buffer too small"):
        REGION.fast_crop(_jpeg(500, 375, 3), out, 256, Image.BILINEAR, 0, 0, -1, small)


@needs_region
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "lanczos"])
def test_vector_and_scalar_resize_agree(interpolation, monkeypatch):
    """The SSE4.1/AVX2 passes compute the scalar passes' sums: the same pixels, at every crop width
    (the vector passes leave a row's last pixels to the scalar code)."""
    data = [_jpeg(500, 375, 1, quality=90), _jpeg(2100, 1600, 2, quality=85), _jpeg(333, 500, 3, quality=95)]
    resample = dec.INTERPOLATIONS[interpolation]
    for crop in (224, 13, 9, 7, 1):
        outs = {}
        for scalar in (False, True):
            # IE_SCALAR (8) rides on the flags argument: the test-only switch of the C code
            monkeypatch.setattr(jpegregion, "FASTDCT", 8 if scalar else 1)
            got = []
            for d in data:
                out = np.zeros((crop, crop + 3, 3), np.uint8)
                dec._preprocess_fast(d, out, 256, resample, None, fastdct=scalar)
                got.append(out)
            outs[scalar] = np.stack(got)
        np.testing.assert_array_equal(outs[False], outs[True], err_msg=f"crop {crop}")


@needs_region
def test_fast_mode_uses_it_and_matches_the_whole_image_path(monkeypatch):
    data = _jpeg(500, 375, 7, quality=90)
    calls = []
    real = REGION.fast_crop
    monkeypatch.setattr(REGION, "fast_crop", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = np.zeros((224, 224, 3), np.uint8)
    dec.preprocess_into(data, a, 256, "bilinear", "fast")
    assert calls == [1]  # one call: the scratch buffer is big enough for an ImageNet-sized file
    monkeypatch.setattr(dec, "_REGION", None)  # the simplejpeg (or Pillow) path: whole image, Pillow resize
    b = np.zeros((224, 224, 3), np.uint8)
    dec.preprocess_into(data, b, 256, "bilinear", "fast")
    d = np.abs(a.astype(np.int16) - b)
    assert d.max() <= 1 and (d > 0).mean() < 0.01


@needs_region
@pytest.mark.parametrize("cut", [0.3, 0.97])
def test_damage_below_the_window_is_seen(cut):
    """A file cut inside the rows under the crop (0.97) fails in fast mode as in exact mode: it does
    not end with its EOI marker, so the rows after the window are entropy-decoded to the end."""
    full = _jpeg(375, 500, 4, quality=92)
    data = full[: int(len(full) * cut)]
    reasons = []
    for mode in ("exact", "fast"):
        try:
            dec.preprocess_into(data, np.zeros((224, 224, 3), np.uint8), 256, "bilinear", mode)
            reasons.append(None)
        except dec.DecodeError as e:
            reasons.append(str(e))
    assert reasons[0] is not None and reasons[0] == reasons[1], reasons
    with pytest.raises(jpegregion.RegionError):
        _window(data, 1, 0, (80, 80, 200, 200))


@needs_region
def test_rows_below_the_window_of_a_whole_file_are_not_decoded(monkeypatch):
    """Bytes garbled in the last rows of a file that still ends with EOI: the window above decodes
    without a word from libjpeg (those rows were never read), and exact mode's output is still
    Pillow's decode of the damaged file, resized and cropped (Pillow ignores the warnings)."""
    full = _jpeg(375, 500, 4, quality=92)
    rng = np.random.default_rng(3)
    garbled = bytearray(full)
    tail = slice(len(full) - 400, len(full) - 2)
    garbled[tail] = bytes(rng.integers(0, 255, tail.stop - tail.start, dtype=np.uint8))  # no 0xFF: no marker
    garbled = bytes(garbled)
    with pytest.raises(jpegregion.RegionError):
        _window(garbled, 1, 0, (0, 0, 375, 500))  # the whole image reads the damage: a warning
    _window(garbled, 1, 0, (80, 80, 200, 200))  # rows 80-280 of 500: no error
    img = Image.open(io.BytesIO(garbled)).convert("RGB").resize((256, 341), Image.BILINEAR)
    ref = np.asarray(img.crop((16, 58, 240, 282)))
    used = []
    real = REGION.decode_placed
    monkeypatch.setattr(REGION, "decode_placed", lambda *a: used.append(real(*a)) or used[-1])
    out = np.zeros((224, 224, 3), np.uint8)
    dec.preprocess_into(garbled, out, 256, "bilinear", "exact")
    assert len(used) == 1  # the region decoder took it (no fallback to Pillow)
    np.testing.assert_array_equal(out, ref)


def test_status_says_why_when_not_built(monkeypatch, tmp_path):
    src = tmp_path / "_jpegregion.c"
    src.write_text(jpegregion.SOURCE.read_text() + "\n/* another source */\n")
    monkeypatch.setattr(jpegregion, "SOURCE", src)
    jpegregion._reset()
    try:
        assert jpegregion.load() is None
        assert "not built" in jpegregion.status() and "preprocess.native --build" in jpegregion.status()
        monkeypatch.setenv(jpegregion.DISABLE_ENV, "0")
        jpegregion._reset()
        assert jpegregion.load() is None and "turned off" in jpegregion.status()
    finally:
        monkeypatch.undo()
        jpegregion._reset()
        jpegregion.load()


def test_build_failures_are_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(jpegregion, "SOURCE", tmp_path / "_jpegregion.c")
    (tmp_path / "_jpegregion.c").write_text("#include <no_such_header_here.h>\n")
    with pytest.raises(RuntimeError, match="failed"):
        jpegregion.build(quiet=True)
    with pytest.raises(RuntimeError, match="no C compiler"):
        jpegregion.build(cc="no-such-cc-here", quiet=True)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.so"))


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_native_build_and_check_commands(tmp_path):
    """`python -m preprocess.native --build --check` on a copy of the package: builds, loads, says so."""
    pkg = tmp_path / "preprocess"
    shutil.copytree(os.path.join(ROOT, "preprocess"), pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(os.path.join(ROOT, "engine"), tmp_path / "engine", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "preprocess.native", "--check"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "not built" in r.stdout
    r = subprocess.run([sys.executable, "-m", "preprocess.native", "--build", "--check"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "jpeglib.h" in r.stderr:
        pytest.skip("no libjpeg-turbo headers here")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "region decoder on libjpeg-turbo" in r.stdout and len(list(pkg.glob("_jpegregion-*.so"))) == 1


@needs_region
@pytest.mark.parametrize("resize,crop,interpolation", [
    (256, 224, "bilinear"), (256, 224, "bicubic"), (342, 299, "lanczos"), ((300, 200), 180, "box"),
    (64, 56, "hamming"), (256, 300, "bilinear"),
])
def test_exact_mode_decoding_only_the_window_is_bit_identical(resize, crop, interpolation, monkeypatch):
    """Exact mode decodes only the window its crop of the full-image resize reads, into a stale
    image-sized buffer: the pixels are those of the full decode, bit for bit, over many sizes
    (the exactness tests then hold them to torchvision)."""
    used = []
    real = REGION.decode_placed
    monkeypatch.setattr(REGION, "decode_placed", lambda *a: used.append(1) or real(*a))
    rng = np.random.default_rng([11, crop])
    for trial in range(12):
        w, h = int(rng.integers(40, 1400)), int(rng.integers(40, 1100))
        data = _jpeg(w, h, trial, quality=int(rng.integers(60, 97)), subsampling=trial % 3,
                     progressive=trial % 4 == 0)
        a = np.zeros((crop, crop, 3), np.uint8)
        dec.preprocess_into(data, a, resize, interpolation, "exact")
        monkeypatch.setattr(dec, "_REGION", None)  # the whole image through simplejpeg, else Pillow
        b = np.full((crop, crop, 3), 5, np.uint8)
        dec.preprocess_into(data, b, resize, interpolation, "exact")
        monkeypatch.setattr(dec, "_REGION", REGION)
        np.testing.assert_array_equal(a, b, err_msg=f"{w}x{h} {resize} {crop} {interpolation}")
    assert len(used) == 12


def test_a_huge_image_does_not_stay_in_the_worker():
    """The reused decode buffer is kept only up to 64 MiB: a 16k x 16k image's gigabyte goes with it."""
    dec._scratch(1000)
    big = dec._scratch(dec._SCRATCH_KEEP + 1)
    assert big.size == dec._SCRATCH_KEEP + 1
    assert dec._LOCAL.buf.size <= dec._SCRATCH_KEEP

"""preprocess/: exact mode is bit-identical to torchvision; every bad file is a DecodeError.

The reference is torchvision itself: its ImageFolder loader
(``torchvision.datasets.folder.pil_loader``, i.e. ``Image.open(f).convert("RGB")``)
on a file written to disk, then ``Resize -> CenterCrop`` and ``np.asarray``.

Decompression bombs are tested both ways: with the ``max_pixels`` argument,
and with Pillow's own limit lowered through ``monkeypatch`` on
``Image.MAX_IMAGE_PIXELS``.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, features

pytest.importorskip("torch")
tv_transforms = pytest.importorskip("torchvision.transforms")
from torchvision.datasets.folder import pil_loader  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

from engine.synthetic import encode_jpeg, make_image  # noqa: E402
from preprocess import decode  # noqa: E402
from preprocess import (  # noqa: E402
    INTERPOLATIONS,
    DecodeError,
    center_crop_box,
    crop_padding,
    open_rgb,
    preprocess_into,
    resized_size,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IM = tv_transforms.InterpolationMode
TV_INTERPOLATION = {
    "nearest": IM.NEAREST,
    "bilinear": IM.BILINEAR,
    "bicubic": IM.BICUBIC,
    "lanczos": IM.LANCZOS,
    "box": IM.BOX,
    "hamming": IM.HAMMING,
}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- inputs


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    return make_image(np.random.default_rng([7, seed, width, height]), width, height, label=seed % 1000)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _jpeg(width: int, height: int, seed: int = 0, **kw) -> bytes:
    return encode_jpeg(_photo(width, height, seed), **kw)


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    return _save(_photo(400, 300, 3), "JPEG", quality=90, exif=exif.tobytes())


def _png_i16() -> bytes:
    ramp = (np.arange(300 * 260, dtype=np.uint32).reshape(260, 300) * 7 % 65536).astype(np.uint16)
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    return _save(img, "PNG")


def _palette(img: Image.Image, colors: int = 256) -> Image.Image:
    return img.quantize(colors, method=Image.Quantize.FASTOCTREE)  # median cut is slow


def _png_palette_transparent() -> bytes:
    img = _palette(_photo(310, 290, 5), 64)
    img.info["transparency"] = 3
    return _save(img, "PNG", transparency=3)


CASES = {
    # normal photos and sizes
    "jpeg-500x375": lambda: _jpeg(500, 375, 1),
    "jpeg-375x500": lambda: _jpeg(375, 500, 2),
    "jpeg-500x333": lambda: _jpeg(500, 333, 3),
    "jpeg-1200x900": lambda: _jpeg(1200, 900, 4),
    # smaller than the crop, odd, tiny, extreme
    "jpeg-100x80": lambda: _jpeg(100, 80),
    "jpeg-223x500": lambda: _jpeg(223, 500),
    "jpeg-257x255": lambda: _jpeg(257, 255),
    "jpeg-1x1": lambda: _jpeg(1, 1),
    "jpeg-3x1000": lambda: _jpeg(3, 1000),
    "jpeg-2000x50": lambda: _jpeg(2000, 50),
    "jpeg-256x256-no-resize": lambda: _jpeg(256, 256),
    "jpeg-341x256-no-resize": lambda: _jpeg(341, 256),
    "jpeg-227x300-round-half": lambda: _jpeg(227, 300),
    # colour modes and encodings
    "jpeg-grayscale-L": lambda: _jpeg(500, 375, 6, mode="L"),
    "jpeg-cmyk": lambda: _jpeg(500, 375, 7, mode="CMYK"),
    "jpeg-progressive": lambda: _jpeg(500, 375, 8, progressive=True),
    "jpeg-exif-orientation-6": _exif_rotated_jpeg,
    "png-rgb": lambda: _save(_photo(320, 240, 9), "PNG"),
    "png-palette": lambda: _save(_palette(_photo(300, 280, 10)), "PNG"),
    "png-palette-transparency": _png_palette_transparent,
    "png-rgba": lambda: _save(_photo(333, 250, 11).convert("RGBA"), "PNG"),
    "png-la": lambda: _save(_photo(250, 333, 12).convert("LA"), "PNG"),
    "png-16bit-I;16": _png_i16,
    "png-1bit": lambda: _save(_photo(260, 260, 13).convert("1"), "PNG"),
    "gif": lambda: _save(_palette(_photo(300, 240, 14)), "GIF"),
    "bmp": lambda: _save(_photo(250, 260, 15), "BMP"),
    "tiff": lambda: _save(_photo(280, 250, 16), "TIFF"),
}
if features.check("webp"):  # pillow-simd builds may lack it
    CASES["webp"] = lambda: _save(_photo(300, 250, 17), "WEBP", quality=90)


@pytest.fixture(scope="module")
def case_files(tmp_path_factory):
    """Every case written to disk with a ".JPEG" name, as ImageNet names its files."""
    root = tmp_path_factory.mktemp("cases")
    files = {}
    for name, make in CASES.items():
        path = root / f"{name}.JPEG"  # PNG, GIF, ... bytes behind a .JPEG name too
        path.write_bytes(make())
        files[name] = str(path)
    return files


def reference(path: str, resize=256, crop=224, interpolation="bilinear") -> np.ndarray:
    img = pil_loader(path)
    pipeline = tv_transforms.Compose(
        [tv_transforms.Resize(resize, interpolation=TV_INTERPOLATION[interpolation]), tv_transforms.CenterCrop(crop)]
    )
    return np.asarray(pipeline(img))


def ours(path: str, resize=256, crop=224, interpolation="bilinear") -> np.ndarray:
    crop_h, crop_w = (crop, crop) if isinstance(crop, int) else crop
    out = np.full((crop_h, crop_w, 3), 0xAB, dtype=np.uint8)  # garbage: every pixel must be written
    with open(path, "rb") as f:
        preprocess_into(f.read(), out, resize, interpolation)
    return out


def assert_same(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {a.shape} != reference {b.shape}"
    if not np.array_equal(a, b):
        diff = np.argwhere(np.any(a != b, axis=-1))
        raise AssertionError(f"{what}: {len(diff)} pixels differ from torchvision, first at (y, x) {tuple(diff[0])}")


# --------------------------------------------------------------------------- exact mode


def test_loader_state():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False, "truncated images must fail, not be padded"


@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_resize256_crop224(case_files, name):
    path = case_files[name]
    assert_same(ours(path), reference(path), name)


COMBOS = [
    (232, 224, "bicubic"),
    (160, 224, "bilinear"),  # crop larger than the resized image: zero padding
    (256, (224, 192), "bilinear"),  # non-square crop
    (256, (192, 224), "bicubic"),
    (256, 225, "bilinear"),  # odd crop: round-half-even offsets
    ((256, 256), 224, "bilinear"),  # (h, w) resize
    ((300, 200), (224, 160), "lanczos"),
    (256, 224, "nearest"),
    (256, 224, "lanczos"),
    (256, 224, "box"),
    (256, 224, "hamming"),
    (224, 224, "bilinear"),
]
COMBO_CASES = [
    "jpeg-500x375",
    "jpeg-375x500",
    "jpeg-100x80",
    "jpeg-223x500",
    "jpeg-257x255",
    "jpeg-cmyk",
    "png-palette",
    "jpeg-2000x50",
]


@pytest.mark.parametrize("resize,crop,interpolation", COMBOS, ids=lambda v: str(v).replace(" ", ""))
def test_exact_other_settings(case_files, resize, crop, interpolation):
    for name in COMBO_CASES:
        path = case_files[name]
        assert_same(
            ours(path, resize, crop, interpolation),
            reference(path, resize, crop, interpolation),
            f"{name} resize={resize} crop={crop} {interpolation}",
        )


def test_exif_orientation_is_ignored(case_files):
    path = case_files["jpeg-exif-orientation-6"]
    with Image.open(path) as img:
        assert img.getexif().get(0x0112) == 6
        transposed = ImageOps.exif_transpose(img).convert("RGB")
    assert transposed.size == (300, 400)
    rotated = np.asarray(tv_transforms.Compose([tv_transforms.Resize(256), tv_transforms.CenterCrop(224)])(transposed))
    got = ours(path)
    assert not np.array_equal(got, rotated), "EXIF orientation was applied; the reference loader ignores it"
    assert_same(got, reference(path), "exif")


@pytest.mark.parametrize("name", ["jpeg-500x375", "jpeg-cmyk", "png-rgba", "png-16bit-I;16", "jpeg-grayscale-L"])
def test_open_rgb_matches_loader(case_files, name):
    path = case_files[name]
    with open(path, "rb") as f:
        img = open_rgb(f.read())
    assert img.mode == "RGB"
    assert_same(np.asarray(img), np.asarray(pil_loader(path)), name)


def test_normalised_floats_match_totensor_normalize(case_files):
    normalize = tv_transforms.Compose([tv_transforms.ToTensor(), tv_transforms.Normalize(MEAN, STD)])
    mean = np.asarray(MEAN, dtype=np.float32)
    std = np.asarray(STD, dtype=np.float32)
    for name in ("jpeg-500x375", "jpeg-cmyk", "jpeg-100x80", "png-rgba"):
        path = case_files[name]
        crop = ours(path)
        floats = (crop.astype(np.float32) / np.float32(255) - mean) / std  # HWC, what the device computes
        pipeline = tv_transforms.Compose([tv_transforms.Resize(256), tv_transforms.CenterCrop(224)])
        expected = normalize(pipeline(pil_loader(path))).numpy().transpose(1, 2, 0)
        assert floats.dtype == np.float32
        np.testing.assert_allclose(floats, expected, rtol=0, atol=1e-6, err_msg=name)


# --------------------------------------------------------------------------- geometry


def test_resized_size_matches_torchvision():
    from torchvision.transforms.functional import _compute_resized_output_size

    rng = np.random.default_rng(0)
    sizes = [(1, 1), (3, 1000), (2000, 50), (500, 375), (375, 500), (256, 256), (257, 255), (333, 500)]
    sizes += [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(300)]
    for w, h in sizes:
        for size in (256, 232, 224, 160, 1, 299):
            new_h, new_w = _compute_resized_output_size((h, w), [size])
            assert resized_size(w, h, size) == (new_w, new_h), (w, h, size)
            assert resized_size(w, h, [size]) == (new_w, new_h), (w, h, size)
        for max_size in (300, 512):
            new_h, new_w = _compute_resized_output_size((h, w), [256], max_size)
            assert resized_size(w, h, 256, max_size) == (new_w, new_h), (w, h, max_size)
        assert resized_size(w, h, (200, 300)) == (300, 200)
    with pytest.raises(ValueError):
        resized_size(500, 375, 256, max_size=256)


def test_center_crop_matches_torchvision():
    # Pixels that encode their coordinates: the crop torchvision returns tells
    # which box it took and where it padded (coordinate 0 is kept for padding).
    for w in range(1, 14):
        for h in range(1, 14):
            ys, xs = np.mgrid[0:h, 0:w]
            img = Image.fromarray(np.stack([xs + 1, ys + 1, np.full_like(xs, 9)], -1).astype(np.uint8), "RGB")
            for crop_h, crop_w in ((1, 1), (4, 4), (5, 8), (8, 5), (7, 7), (13, 2), (16, 16)):
                expected = np.asarray(TF.center_crop(img, [crop_h, crop_w]))
                left, top, right, bottom = center_crop_box(w, h, crop_h, crop_w)
                assert (right - left, bottom - top) == (crop_w, crop_h)
                pl, pt, pr, pb = crop_padding(w, h, crop_h, crop_w)
                assert pl + pr == max(0, crop_w - w) and pt + pb == max(0, crop_h - h)
                built = np.zeros((crop_h, crop_w, 3), dtype=np.uint8)
                for y in range(crop_h):
                    for x in range(crop_w):
                        sx, sy = left + x, top + y
                        if 0 <= sx < w and 0 <= sy < h:
                            built[y, x] = (sx + 1, sy + 1, 9)
                assert np.array_equal(built, expected), (w, h, crop_h, crop_w)
                # And the pixel path itself.
                out = np.full((crop_h, crop_w, 3), 0xAB, dtype=np.uint8)
                preprocess_into(_save(img, "PNG"), out, (h, w), "nearest")
                assert np.array_equal(out, expected), (w, h, crop_h, crop_w)


def test_round_half_to_even_offsets():
    # torchvision uses int(round(x / 2.0)): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    assert center_crop_box(225, 224, 224, 224)[0] == 0
    assert center_crop_box(227, 224, 224, 224)[0] == 2
    assert center_crop_box(229, 224, 224, 224)[0] == 2
    assert center_crop_box(341, 256, 224, 224) == (58, 16, 282, 240)


# --------------------------------------------------------------------------- failures


def _reason(data: bytes, **kw) -> str:
    out = np.zeros((224, 224, 3), dtype=np.uint8)
    with pytest.raises(DecodeError) as info:
        preprocess_into(data, out, 256, **kw)
    return str(info.value)


def test_decode_errors():
    jpeg = _jpeg(500, 375, 20)
    assert _reason(b"") == "empty file"
    assert _reason(jpeg[: len(jpeg) // 2]) == "truncated JPEG"
    assert _reason(jpeg[:100]) == "truncated JPEG"
    assert _reason(np.random.default_rng(0).bytes(5000)) == "not an image (cannot identify image file)"
    assert _reason(b"n01440764\ttench\nthis is a text file\n" * 20) == "not an image (cannot identify image file)"
    png = _save(_photo(300, 200, 21), "PNG")
    assert _reason(png[: len(png) // 2]).startswith("truncated PNG")


def test_decompression_bomb_with_limit_argument():
    jpeg = _jpeg(500, 375, 22)
    assert _reason(jpeg, max_pixels=100_000) == "decompression bomb: 187500 pixels > limit 100000"
    out = np.zeros((224, 224, 3), dtype=np.uint8)
    preprocess_into(jpeg, out, 256, max_pixels=187_500)  # exactly at the limit: fine
    with pytest.raises(DecodeError, match="decompression bomb"):
        open_rgb(jpeg, max_pixels=1000)


def test_decompression_bomb_with_pillow_limit(monkeypatch):
    jpeg = _jpeg(500, 375, 23)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # Pillow errors above twice this
    assert _reason(jpeg) == "decompression bomb: 187500 pixels > limit 20000"


def test_resize_bomb_is_refused():
    # 1 x 2000 pixels is small, but its shorter side to 256 asks for 256 x 512000.
    thin = _save(Image.new("RGB", (1, 2000), (10, 20, 30)), "PNG")
    assert _reason(thin, max_pixels=1_000_000).startswith("decompression bomb: resize to 256x512000")


def test_decode_error_pickles():
    err = DecodeError("truncated JPEG", "image file is truncated (5 bytes not processed)")
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), str(back), back.reason, back.detail) == (DecodeError, err.reason, err.reason, err.detail)


def test_bad_arguments_are_not_decode_errors():
    jpeg = _jpeg(64, 48, 24)
    good = np.zeros((224, 224, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_into(jpeg, np.zeros((224, 224, 3), dtype=np.float32), 256)
    with pytest.raises(ValueError, match=r"\(224, 224\)"):
        preprocess_into(jpeg, np.zeros((224, 224), dtype=np.uint8), 256)
    readonly = good.copy()
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        preprocess_into(jpeg, readonly, 256)
    with pytest.raises(ValueError, match="interpolation"):
        preprocess_into(jpeg, good, 256, "cubic")
    with pytest.raises(ValueError, match="resize"):
        preprocess_into(jpeg, good, 0)
    preprocess_into(jpeg, good, 256, mode="fast")  # fast mode: tests/test_fast_decode.py
    with pytest.raises(ValueError, match="mode"):
        preprocess_into(jpeg, good, 256, mode="turbo")
    assert set(INTERPOLATIONS) == set(TV_INTERPOLATION)


def test_writes_into_a_strided_view():
    # A slot of a shared batch: out is a view, never reallocated.
    jpeg = _jpeg(500, 375, 25)
    batch = np.zeros((3, 224, 224, 3), dtype=np.uint8)
    preprocess_into(jpeg, batch[1], 256)
    path_free = np.zeros((224, 224, 3), dtype=np.uint8)
    preprocess_into(jpeg, path_free, 256)
    assert np.array_equal(batch[1], path_free) and not batch[0].any() and not batch[2].any()


def test_preprocess_does_not_import_torch():
    code = (
        "import sys; import preprocess, preprocess.decode, preprocess.geometry, engine.synthetic; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.skipif(decode.simplejpeg is None, reason="simplejpeg is not installed")
@pytest.mark.parametrize("options", [
    {"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2}, {"subsampling": 2, "progressive": True},
    {"subsampling": 2, "optimize": True}, {"subsampling": 1, "restart_marker_blocks": 4}, {"quality": 50},
])
def test_exact_mode_libjpeg_turbo_decode_is_pillows(options):
    """Exact mode's simplejpeg path gives Pillow's decoded pixels, bit for bit (and so torchvision's)."""

    img = make_image(np.random.default_rng(5), 333, 257, 3)
    buf = io.BytesIO()
    try:
        img.save(buf, "JPEG", quality=options.pop("quality", 90), **options)
    except TypeError:
        pytest.skip(f"this Pillow cannot write {options}")
    data = buf.getvalue()
    turbo = decode._exact_jpeg(data, None)
    assert turbo is not None, "the libjpeg-turbo path refused a plain YCbCr JPEG"
    np.testing.assert_array_equal(np.asarray(turbo), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    a, b = np.zeros((224, 224, 3), np.uint8), np.zeros((224, 224, 3), np.uint8)
    decode.preprocess_into(data, a, 256)
    with_pillow = decode._EXACT_TURBO
    try:
        decode._EXACT_TURBO = False
        decode.preprocess_into(data, b, 256)
    finally:
        decode._EXACT_TURBO = with_pillow
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(decode.simplejpeg is None, reason="simplejpeg is not installed")
def test_exact_mode_leaves_cmyk_grey_and_broken_jpegs_to_pillow():

    img = make_image(np.random.default_rng(6), 300, 200, 1)
    for mode in ("CMYK", "L"):
        buf = io.BytesIO()
        img.convert(mode).save(buf, "JPEG", quality=90)
        assert decode._exact_jpeg(buf.getvalue(), None) is None
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    assert decode._exact_jpeg(buf.getvalue()[:2000], None) is None  # truncated: Pillow gives the reason
    assert decode._exact_jpeg(buf.getvalue(), max_pixels=100) is None  # over the limit: Pillow's message

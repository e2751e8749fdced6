"""--resize H,W and --preset modelzoo-acc-eval.

The preset must be the ModelZoo script's preprocessing exactly: its pixels are compared with
torchvision's own transforms with those parameters (`Resize([256, 256], BICUBIC)`,
`CenterCrop([224, 224])`, then `ToTensor`, `Normalize([0.485, 0.456, 0.06], IMAGENET_STD)`) on
generated images, and a whole `run-eval --preset modelzoo-acc-eval` is checked against a plain
torchvision DataLoader loop with those transforms (the counts equal). The flag parsing, the
override rules and the report's statement of what differs are checked too.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transforms = pytest.importorskip("torchvision.transforms")
from PIL import Image  # noqa: E402
from torchvision.datasets.folder import pil_loader  # noqa: E402

from conftest import ROOT, run_cli  # noqa: E402
from engine.cli import config_from_args, eval_parser  # noqa: E402
from engine.config import (IMAGENET_STD, NAMED_PRESETS, ConfigError, PreprocessSpec, format_resize,  # noqa: E402
                           parse_resize, preprocess_differences, resolve_config)
from engine.synthetic import encode_jpeg, make_image  # noqa: E402
from preprocess import decode as dec  # noqa: E402
from preprocess import preprocess_into  # noqa: E402

PRESET = "modelzoo-acc-eval"
# acc_eval.py's transforms, written out as that script writes them
SCRIPT_MEAN, SCRIPT_STD = [0.485, 0.456, 0.06], [0.229, 0.224, 0.225]


def script_transforms(to_tensor: bool = True):
    steps = [transforms.Resize([256, 256], interpolation=transforms.InterpolationMode.BICUBIC),
             transforms.CenterCrop([224, 224])]
    if to_tensor:
        steps += [transforms.ToTensor(), transforms.Normalize(mean=SCRIPT_MEAN, std=SCRIPT_STD)]
    return transforms.Compose(steps)


def _image_bytes(width: int, height: int, seed: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    img = make_image(np.random.default_rng([31, seed, width, height]), width, height, label=seed)
    if fmt == "JPEG":
        return encode_jpeg(img, mode=mode)
    buf = io.BytesIO()
    img.convert(mode).save(buf, fmt)
    return buf.getvalue()


# landscape, portrait, already square, smaller than 256 (upscaled) and than the crop, extreme
# aspect ratios, 256x256 (no resize), greyscale, CMYK, PNG with alpha
IMAGES = [
    ((500, 375), "JPEG", "RGB"), ((375, 500), "JPEG", "RGB"), ((333, 500), "JPEG", "RGB"),
    ((400, 400), "JPEG", "RGB"), ((200, 150), "JPEG", "RGB"), ((100, 80), "JPEG", "RGB"),
    ((2000, 60), "JPEG", "RGB"), ((1200, 900), "JPEG", "RGB"), ((256, 256), "JPEG", "RGB"),
    ((500, 375), "JPEG", "L"), ((500, 375), "JPEG", "CMYK"), ((320, 240), "PNG", "RGBA"),
]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("preset_images")
    paths = []
    for i, ((w, h), fmt, mode) in enumerate(IMAGES):
        path = root / f"{w}x{h}-{mode}.JPEG"
        path.write_bytes(_image_bytes(w, h, i, fmt, mode))
        paths.append(str(path))
    return paths


# --------------------------------------------------------------------------- the --resize flag


@pytest.mark.parametrize("text, value", [("256", 256), ("256,256", (256, 256)), (" 300 , 200 ", (300, 200)),
                                         ("1,1", (1, 1))])
def test_parse_resize(text, value):
    assert parse_resize(text) == value
    assert parse_resize(format_resize(value)) == value


@pytest.mark.parametrize("text", ["", "256,", ",256", "a", "256x256", "0", "256,0", "-3", "1,2,3", "2.5"])
def test_malformed_resize_says_what_to_give(text):
    with pytest.raises(ConfigError, match=r"--resize needs one number \(the shorter side, like 256\) or two, "
                                          r"H,W \(exactly that size, like 256,256\)"):
        parse_resize(text)


def test_malformed_resize_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        eval_parser().parse_args(["--data", "x", "--resize", "256x256"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --resize: needs one number (the shorter side, like 256) or two, H,W" in err
    assert "(got '256x256')" in err


@pytest.mark.parametrize("resize", [0, -1, (256,), (256, 0), (1, 2, 3), "256", 2.0, True, (True, 5)])
def test_spec_refuses_a_bad_resize(resize):
    with pytest.raises(ConfigError, match="--resize"):
        PreprocessSpec(resize=resize)


def test_spec_takes_a_list_from_json_as_a_pair():
    spec = PreprocessSpec(resize=[256, 200])
    assert spec.resize == (256, 200) and spec == PreprocessSpec(resize=(256, 200))
    assert json.loads(json.dumps(spec.__dict__))["resize"] == [256, 200]


def test_resize_pair_reaches_the_config():
    a = eval_parser().parse_args(["--data", "x", "--resize", "256,200"])
    cfg = config_from_args(a)
    assert cfg.preprocess.resize == (256, 200) and cfg.preset is None
    a = eval_parser().parse_args(["--data", "x", "--resize", "232"])
    assert config_from_args(a).preprocess.resize == 232


# --------------------------------------------------------------------------- the --preset flag


def test_preset_is_the_scripts_preprocessing():
    a = eval_parser().parse_args(["--data", "x", "--preset", PRESET])
    spec = config_from_args(a).preprocess
    assert spec == PreprocessSpec(resize=(256, 256), crop=224, interpolation="bicubic",
                                  mean=(0.485, 0.456, 0.06), std=IMAGENET_STD, decode="exact")
    assert config_from_args(a).preset == PRESET


def test_every_field_of_the_preset_is_overridable():
    a = eval_parser().parse_args(["--data", "x", "--preset", PRESET, "--mean", "0.485,0.456,0.406",
                                  "--resize", "256", "--interpolation", "bilinear", "--crop", "200",
                                  "--std", "0.2,0.2,0.2", "--decode", "fast"])
    spec = config_from_args(a).preprocess
    assert spec == PreprocessSpec(resize=256, crop=200, interpolation="bilinear", mean=(0.485, 0.456, 0.406),
                                  std=(0.2, 0.2, 0.2), decode="fast")


def test_preset_replaces_the_model_preset():
    # inception_v3's own preset is 342/299; the named preset starts from the script's instead
    cfg = resolve_config("inception_v3", preset=PRESET)
    assert (cfg.preprocess.resize, cfg.preprocess.crop) == ((256, 256), 224)
    assert resolve_config("inception_v3").preprocess.resize == 342


def test_unknown_preset(capsys):
    with pytest.raises(ConfigError, match="--preset 'nope' is not one of modelzoo-acc-eval"):
        resolve_config("resnet18", preset="nope")
    with pytest.raises(SystemExit):
        eval_parser().parse_args(["--data", "x", "--preset", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("prog", ["run-eval", "run-bench", "run-score"])
def test_parsers_take_no_abbreviations(prog, capsys):
    from engine.bench import bench_parser
    from engine.scoring.run import score_parser

    parser = {"run-eval": eval_parser, "run-bench": bench_parser, "run-score": score_parser}[prog]()
    base = {"run-eval": ["--data", "x"], "run-bench": [], "run-score": ["--data", "x", "--out", "y"]}[prog]
    args = parser.parse_args(base + ["--preset", PRESET, "--resize", "256,256"])
    assert args.preset == PRESET and args.resize == (256, 256)
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--pres", PRESET])  # with abbreviations on, this was --preset
    assert "unrecognized arguments: --pres" in capsys.readouterr().err


def test_differences_name_each_cause():
    diffs = {d["field"]: d for d in preprocess_differences(NAMED_PRESETS[PRESET].spec, "resnext50_32x4d")}
    assert sorted(diffs) == ["interpolation", "mean", "resize"]
    assert diffs["resize"]["used"] == "to exactly 256x256 (h x w; the aspect ratio not kept)"
    assert diffs["resize"]["correct"] == "shorter side to 256"
    assert (diffs["interpolation"]["used"], diffs["interpolation"]["correct"]) == ("bicubic", "bilinear")
    assert (diffs["mean"]["used"], diffs["mean"]["correct"]) == ("(0.485, 0.456, 0.06)", "(0.485, 0.456, 0.406)")
    assert preprocess_differences(resolve_config("resnext50_32x4d").preprocess, "resnext50_32x4d") == []


# --------------------------------------------------------------------------- pixels


def test_preset_pixels_are_torchvisions(image_files):
    """Exact mode with the preset: the pixels of acc_eval.py's Resize + CenterCrop, bit for bit."""
    spec = NAMED_PRESETS[PRESET].spec
    ref = script_transforms(to_tensor=False)
    for path in image_files:
        want = np.asarray(ref(pil_loader(path)))
        got = np.full((224, 224, 3), 0xAB, np.uint8)
        with open(path, "rb") as f:
            preprocess_into(f.read(), got, spec.resize, spec.interpolation, "exact")
        assert want.shape == got.shape, path
        bad = np.argwhere(np.any(want != got, axis=-1))
        assert not len(bad), f"{path}: {len(bad)} pixels differ from torchvision's, first at (y, x) {tuple(bad[0])}"


def test_preset_tensor_is_torchvisions(image_files):
    """With the normalisation (mean 0.06 included): the model input equals ToTensor + Normalize."""
    from engine.models.zoo import InputAdapter

    spec = NAMED_PRESETS[PRESET].spec
    ref = script_transforms()
    adapter = InputAdapter(spec.mean, spec.std)
    for path in image_files[:4]:
        want = ref(pil_loader(path))
        pixels = np.zeros((1, 224, 224, 3), np.uint8)
        with open(path, "rb") as f:
            preprocess_into(f.read(), pixels[0], spec.resize, spec.interpolation, "exact")
        got = adapter(torch.from_numpy(pixels))[0]
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (path, float((got - want).abs().max()))
        # the blue channel is shifted by (0.406 - 0.06) / 0.225 against ImageNet's mean
        right = transforms.Normalize([0.485, 0.456, 0.406], SCRIPT_STD)(transforms.ToTensor()(
            script_transforms(to_tensor=False)(pil_loader(path))))
        assert torch.allclose(got[2] - right[2], torch.full_like(got[2], 0.346 / 0.225), atol=1e-5)


@pytest.mark.skipif(dec._REGION is None, reason="region decoder not built (python -m preprocess.native --build)")
def test_fast_mode_takes_the_pair_in_its_one_call(image_files, monkeypatch):
    """--decode fast resizes to the pair in C (no fallback), within rounding of exact mode."""
    calls = []
    real = dec._REGION.fast_crop

    def spy(data, out, resize, *rest, **kw):
        calls.append(resize)
        return real(data, out, resize, *rest, **kw)

    monkeypatch.setattr(dec._REGION, "fast_crop", spy)
    spec = NAMED_PRESETS[PRESET].spec
    rgb_jpegs = [p for p, (_, fmt, mode) in zip(image_files, IMAGES) if fmt == "JPEG" and mode in ("RGB", "L")]
    scales = []
    for path in rgb_jpegs:
        with open(path, "rb") as f:
            data = f.read()
        a, b = np.zeros((224, 224, 3), np.uint8), np.zeros((224, 224, 3), np.uint8)
        preprocess_into(data, a, spec.resize, spec.interpolation, "exact")
        preprocess_into(data, b, spec.resize, spec.interpolation, "fast")
        d = np.abs(a.astype(np.int16) - b.astype(np.int16))
        width, height = Image.open(path).size
        scales.append(dec._dct_scale(width, height, (256, 256)))  # the square target sets the DCT scale
        if scales[-1] == 1:  # full scale: the crop-box resize differs from resize-then-crop by rounding only
            assert d.max() <= 1 and d.mean() < 0.01, (path, int(d.max()), float(d.mean()))
        else:  # a smaller DCT loses fine texture: close, not equal (as tests/test_fast_decode.py)
            assert d.mean() < 3.0, (path, int(d.max()), float(d.mean()))
    assert calls == [(256, 256)] * len(rgb_jpegs)
    assert 1 in scales and 2 in scales, scales  # both kinds were seen


# --------------------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def script_reference(flat_set, tmp_path_factory):
    """A random-weight resnet18, the top-6 of each image under acc_eval.py's transforms, labels
    chosen from them (a third top-1, a third ranks 2-5, the rest misses), the expected counts."""
    import torchvision

    from engine.pipeline.dataset import build_dataset

    n = 36
    tmp = tmp_path_factory.mktemp("preset_ref")
    torch.manual_seed(99)
    net = torchvision.models.resnet18(num_classes=1000).eval()
    weights = str(tmp / "resnet18.pth")
    torch.save(net.state_dict(), weights)
    ds = build_dataset(flat_set, limit=n)
    tf = script_transforms()
    with torch.inference_mode():
        x = torch.stack([tf(pil_loader(ds.abspath(i))) for i in range(n)])
        top6 = net(x).topk(6).indices.tolist()
    labels = [top6[i][[0, 0, 0, 1, 2, 3, 4, 5, 5][i % 9]] for i in range(n)]
    everything = build_dataset(flat_set)
    label_file = str(tmp / "labels.txt")
    with open(label_file, "w") as f:
        for i, path in enumerate(everything.paths):
            f.write(f"{os.path.splitext(path)[0]} {labels[i] if i < n else 0}\n")
    ref1 = sum(labels[i] == top6[i][0] for i in range(n))
    ref5 = sum(labels[i] in top6[i][:5] for i in range(n))
    return weights, label_file, n, ref1, ref5


def test_run_eval_with_the_preset_counts_as_the_script(script_reference, flat_set, tmp_path):
    weights, label_file, n, ref1, ref5 = script_reference
    assert 0 < ref1 < ref5 < n
    out = tmp_path / "r.json"
    r = run_cli([os.path.join(ROOT, "bin", "run-eval"), "--data", flat_set, "--labels", label_file,
                 "--model", "resnet18", "--weights", weights, "--backend", "cpu", "--limit", str(n),
                 "--batch-size", "1", "--workers", "2", "--compute-only-iters", "1", "--no-progress",
                 "--preset", PRESET, "--json", str(out)])
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert (rep["images"], rep["correct_top1"], rep["correct_top5"]) == (n, ref1, ref5)
    spec = rep["config"]["preprocess"]
    assert (spec["resize"], spec["crop"], spec["interpolation"], spec["mean"]) == \
        ([256, 256], 224, "bicubic", [0.485, 0.456, 0.06])
    assert rep["config"]["preset"] == PRESET
    check = rep["preprocessing_check"]
    assert [d["field"] for d in check["differences"]] == ["resize", "interpolation", "mean"]
    assert check["preset"] == PRESET and check["preset_overridden"] == []
    assert "resize (256, 256) crop 224 bicubic" in r.stdout
    assert f"preset        {PRESET}: the preprocessing of Ascend ModelZoo" in r.stdout
    assert "    resize        to exactly 256x256 (h x w; the aspect ratio not kept)  (correct: shorter side to 256)" \
        in r.stdout
    assert "    mean          (0.485, 0.456, 0.06)  (correct: (0.485, 0.456, 0.406))" in r.stdout


def test_run_eval_report_shows_both_figures_for_resnext(flat_set, tmp_path):
    out = tmp_path / "r.json"
    r = run_cli([os.path.join(ROOT, "bin", "run-eval"), "--data", flat_set, "--backend", "sim",
                 "--sim-batch-ms", "1", "--limit", "8", "--batch-size", "4", "--no-progress", "--preset", PRESET,
                 "--mean", "0.485,0.456,0.406", "--decode", "fast", "--json", str(out)])
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    check = rep["preprocessing_check"]
    assert check["script_figure"] == [71.35, 90.502] and check["published_figure"] == [77.618, 93.698]
    assert check["preset_overridden"] == ["mean"]
    assert [d["field"] for d in check["differences"]] == ["resize", "interpolation"]
    assert rep["config"]["preprocess"]["decode"] == "fast" and rep["config"]["preprocess"]["resize"] == [256, 256]
    assert "that script's figure 71.350 / 90.502; torchvision's published figure for its V1 weights with the " \
           "correct preprocessing 77.618 / 93.698 (top-1 / top-5 %)" in r.stdout
    assert "overridden by flags: mean" in r.stdout


def test_run_eval_without_preset_prints_no_preset_lines(flat_set, tmp_path):
    out = tmp_path / "r.json"
    r = run_cli([os.path.join(ROOT, "bin", "run-eval"), "--data", flat_set, "--backend", "sim",
                 "--sim-batch-ms", "1", "--limit", "4", "--batch-size", "4", "--no-progress",
                 "--resize", "240,250", "--json", str(out)])
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["config"]["preprocess"]["resize"] == [240, 250] and rep["config"]["preset"] is None
    assert rep["preprocessing_check"]["differences"][0]["field"] == "resize"
    assert "  preset  " not in r.stdout and "resize (240, 250) crop 224" in r.stdout

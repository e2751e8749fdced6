"""Every model with the preprocessing its weights declare (engine/models/catalog.py).

The references are the libraries' own transforms on the same Pillow: torchvision's
`weights.transforms()` and timm's `create_transform(**resolve_data_config(..., use_test_size=True))`
(validate.py's), applied to the image torchvision's ImageFolder loader gives. Exact mode's pixels
(`preprocess_into`, what the workers run) must equal them bit for bit before normalisation, and
within 1e-6 after. No test downloads anything: timm models are built with pretrained=False and
their weights are state dicts the tests make.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from torchvision.datasets.folder import pil_loader  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

from engine.config import ConfigError, resolve_config  # noqa: E402
from engine.models import catalog  # noqa: E402
from engine.synthetic import encode_jpeg, make_image  # noqa: E402
from preprocess import preprocess_into  # noqa: E402
from tests.conftest import ROOT, run_cli  # noqa: E402

# tests/conftest.py sets HF_HUB_OFFLINE=1: timm and huggingface_hub never reach the network here

# (width, height): landscape, portrait, square-ish, and one smaller than most crops (upscaled)
SIZES = [(500, 375), (375, 500), (640, 480), (260, 190)]

TORCHVISION_WEIGHTS = [
    ("resnext50_32x4d", "IMAGENET1K_V1"),   # 256 / 224 bilinear (the default)
    ("resnext50_32x4d", "IMAGENET1K_V2"),   # 232 / 224
    ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1"),  # 384 / 384 bicubic
    ("convnext_tiny", "IMAGENET1K_V1"),     # 236 / 224
    ("inception_v3", "IMAGENET1K_V1"),      # 342 / 299
    ("efficientnet_b0", "IMAGENET1K_V1"),   # 256 / 224 bicubic
    ("efficientnet_v2_s", "IMAGENET1K_V1"),  # 384 / 384 bilinear
]

TIMM_TAGS = [
    ("legacy_seresnet50.in1k", "test"),            # crop_pct 0.875 bilinear
    ("efficientnet_b0.ra_in1k", "test"),           # 0.875 bicubic
    ("deit_tiny_patch16_224.fb_in1k", "test"),     # 0.9 bicubic
    ("mobileone_s1.apple_in1k", "test"),           # 0.9 bilinear
    ("resnext50_32x4d.a1h_in1k", "train"),         # 0.95 bicubic at 224: resize 235
    ("resnext50_32x4d.a1h_in1k", "test"),          # 1.0 bicubic at 288
    ("resnet50.tv2_in1k", "test"),                 # 0.965 bilinear
    ("convnext_tiny.fb_in22k_ft_in1k_384", "test"),  # squash, 1.0
    ("vit_base_patch16_clip_384.openai_ft_in12k_in1k", "test"),  # squash, 0.95
    ("volo_d4_448.sail_in1k", "test"),             # crop_pct 1.15: the crop is larger than the resize
]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """JPEG files of SIZES (the worker path decodes JPEGs with the region decoder) and one PNG."""
    tmp = tmp_path_factory.mktemp("model_images")
    paths = []
    for k, (w, h) in enumerate(SIZES):
        img = make_image(np.random.default_rng([18, k]), w, h, label=k)
        p = tmp / f"img{k}.jpg"
        p.write_bytes(encode_jpeg(img, quality=90))
        paths.append(str(p))
    png = tmp / "img.png"
    make_image(np.random.default_rng([18, 99]), 333, 250, label=3).save(str(png))
    paths.append(str(png))
    return paths


def _engine_pixels(path: str, spec) -> np.ndarray:
    out = np.empty(spec.shape, dtype=np.uint8)
    with open(path, "rb") as f:
        preprocess_into(f.read(), out, spec.resize, spec.interpolation, "exact")
    return out


def _normalised(pixels: np.ndarray, spec) -> torch.Tensor:
    from engine.models.zoo import InputAdapter

    return InputAdapter(spec.mean, spec.std)(torch.from_numpy(pixels)[None])[0]


@pytest.mark.parametrize("model, tag", TORCHVISION_WEIGHTS)
def test_torchvision_weights_transforms_pixel_for_pixel(images, model, tag):
    transform = torchvision.models.get_model_weights(model)[tag].transforms()
    spec = catalog.resolve(model, tag).spec
    assert catalog.resolve(model, tag).tag == tag
    for path in images:
        img = pil_loader(path)
        # the transform's own steps before the tensor conversion, with its own fields
        ref = TF.center_crop(TF.resize(img, transform.resize_size, interpolation=transform.interpolation,
                                       antialias=transform.antialias), transform.crop_size)
        got = _engine_pixels(path, spec)
        assert np.array_equal(got, np.asarray(ref)), (model, tag, path)
        full = transform(img)  # the whole declared transform: ToTensor-like scaling and Normalize
        assert torch.allclose(_normalised(got, spec), full, atol=1e-6, rtol=0), (model, tag, path)


def test_the_weights_declare_what_torchvision_publishes():
    e = catalog.resolve("resnext50_32x4d", "IMAGENET1K_V2")
    assert (e.spec.resize, e.spec.crop, e.spec.interpolation) == (232, 224, "bilinear")
    assert e.published["top1"] == pytest.approx(81.198) and "IMAGENET1K_V2" in e.published["source"]
    v1 = catalog.resolve("resnext50_32x4d")
    assert v1.tag == "IMAGENET1K_V1" and (v1.spec.resize, v1.published["top1"]) == (256, pytest.approx(77.618))
    default = catalog.resolve("resnext50_32x4d", "DEFAULT")
    assert default.tag == torchvision.models.get_model_weights("resnext50_32x4d").DEFAULT.name
    swag = catalog.resolve("vit_b_16", "IMAGENET1K_SWAG_E2E_V1").spec
    assert (swag.resize, swag.crop, swag.interpolation) == (384, 384, "bicubic")
    # a file named like a tag's download keeps that tag's preprocessing; TAG=FILE names it
    v2_file = os.path.basename(torchvision.models.get_model_weights("resnext50_32x4d").IMAGENET1K_V2.url)
    assert catalog.resolve("resnext50_32x4d", f"/nowhere/{v2_file}").tag == "IMAGENET1K_V2"
    assert catalog.resolve("resnext50_32x4d", "IMAGENET1K_V2=/nowhere/mine.pth").spec.resize == 232
    assert catalog.resolve("resnext50_32x4d", "/nowhere/mine.pth").tag == "IMAGENET1K_V1"


def test_every_torchvision_classification_weight_resolves():
    names = torchvision.models.list_models(module=torchvision.models)
    entries = [e for e in catalog.list_entries() if e.family == "torchvision"]
    want = sum(len(list(torchvision.models.get_model_weights(m))) for m in names)
    assert len(entries) == want and len({e.model for e in entries}) == len(names)
    assert all(e.spec.crop > 0 and e.published for e in entries)


def test_default_runs_keep_the_v1_preprocessing():
    """No --weights: the V1 tag, as before (the cache keys of default runs do not move)."""
    from engine.config import PreprocessSpec

    assert resolve_config("resnext50_32x4d").preprocess == PreprocessSpec()
    assert resolve_config("inception_v3").preprocess.resize == 342
    assert resolve_config("efficientnet_b0").preprocess.interpolation == "bicubic"
    assert resolve_config("tiny").preprocess == PreprocessSpec()  # unknown names: the ImageNet default
    cfg = resolve_config("resnext50_32x4d", {"resize": 240}, weights="IMAGENET1K_V2")
    assert (cfg.preprocess.resize, cfg.preprocess.crop) == (240, 224)  # a flag wins over the weights


def test_bad_tags_say_what_to_change():
    with pytest.raises(ConfigError, match="has no such weights tag.*IMAGENET1K_V1"):
        resolve_config("resnet18", weights="IMAGENET1K_V7")
    with pytest.raises(ConfigError, match="not a torchvision classification model"):
        resolve_config("tiny", weights="IMAGENET1K_V1")


# ---- timm -----------------------------------------------------------------------------------------

def _timm():
    return pytest.importorskip("timm", reason="timm is an extra (pip install imagenet-engine[timm]); "
                                              "scripts/setup-env.sh installs it for make test")


@pytest.mark.parametrize("name, size", TIMM_TAGS)
def test_timm_eval_transform_pixel_for_pixel(images, name, size):
    timm = _timm()
    from timm.data import create_transform, resolve_data_config

    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    dc = resolve_data_config(pretrained_cfg=cfg, use_test_size=(size == "test"))
    steps = []
    for t in create_transform(**dc).transforms:
        if "ToTensor" in type(t).__name__:
            break
        steps.append(t)
    entry = catalog.resolve("timm:" + name, None, None, size)
    spec = entry.spec
    assert spec.crop == dc["input_size"][1] and spec.interpolation == dc["interpolation"]
    for path in images:
        ref = pil_loader(path)
        for t in steps:
            ref = t(ref)
        got = _engine_pixels(path, spec)
        assert np.array_equal(got, np.asarray(ref)), (name, size, path)
        full = create_transform(**dc)(pil_loader(path))
        assert torch.allclose(_normalised(got, spec), full, atol=1e-6, rtol=0), (name, size, path)


def test_timm_declarations_and_published_figures():
    _timm()
    e = catalog.resolve("timm:resnext50_32x4d.a1h_in1k")
    assert (e.spec.resize, e.spec.crop, e.spec.interpolation) == (288, 288, "bicubic")
    assert e.published["top1"] == pytest.approx(82.016) and "img_size 288" in e.published["source"]
    assert set(e.published["others"]) >= {"ReaL", "ImageNet-V2"}
    train = catalog.resolve("timm:resnext50_32x4d.a1h_in1k", None, None, "train")
    assert (train.spec.resize, train.spec.crop) == (235, 224) and train.published["top1"] == pytest.approx(81.14)
    hub = catalog.resolve("timm/resnext50_32x4d")  # the Hub's spelling; no tag: timm's default tag
    assert hub.model.startswith("timm:resnext50_32x4d.") and hub.tag
    squash = catalog.resolve("timm:convnext_tiny.fb_in22k_ft_in1k_384").spec
    assert squash.resize == (384, 384) and squash.crop == 384


def test_timm_refusals_name_the_problem():
    _timm()
    with pytest.raises(ConfigError, match="crop_mode 'border'"):
        catalog.spec_from_timm_data_config({"input_size": (3, 224, 224), "crop_mode": "border", "crop_pct": 1.0,
                                            "interpolation": "bicubic", "mean": (0, 0, 0), "std": (1, 1, 1)}, "x")
    with pytest.raises(ConfigError, match="non-square input 224x320"):
        catalog.spec_from_timm_data_config({"input_size": (3, 224, 320), "crop_pct": 1.0, "interpolation": "bicubic",
                                            "mean": (0, 0, 0), "std": (1, 1, 1)}, "x")
    with pytest.raises(ConfigError, match="no architecture 'nonesuch'"):
        resolve_config("timm:nonesuch.x")
    with pytest.raises(ConfigError, match="no pretrained tag 'nope' for resnet50"):
        resolve_config("timm:resnet50.nope")
    with pytest.raises(ConfigError, match="tag is part of --model"):
        resolve_config("timm:resnet50.a1_in1k", weights="IMAGENET1K_V1")


def test_timm_missing_is_one_line_naming_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_timm(name, *a, **kw):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real(name, *a, **kw)

    catalog.resolve.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ConfigError, match=r"pip install imagenet-engine\[timm\]"):
        catalog.resolve("timm:resnet50.a1_in1k")
    catalog.resolve.cache_clear()


N_TIMM = 24


@pytest.fixture(scope="module")
def timm_reference(flat_set, tmp_path_factory):
    """timm's test_resnet with seeded random weights in a safetensors file, and timm's own eval loop
    (create_model, create_transform(resolve_data_config(model=m, use_test_size=True))) over the
    first N_TIMM images; labels chosen from its ranks as in tests/test_reference.py."""
    timm = _timm()
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file
    from timm.data import create_transform, resolve_data_config

    from engine.pipeline.dataset import build_dataset

    tmp = tmp_path_factory.mktemp("timm_ref")
    torch.manual_seed(4321)
    name = "test_resnet.r160_in1k"
    net = timm.create_model(name, pretrained=False).eval()
    weights = str(tmp / "test_resnet.safetensors")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, weights)
    tf = create_transform(**resolve_data_config(model=net, use_test_size=True))
    ds = build_dataset(flat_set, limit=N_TIMM)
    with torch.inference_mode():
        x = torch.stack([tf(pil_loader(ds.abspath(i))) for i in range(len(ds))])
        top = net(x).topk(6).indices.tolist()
    labels = [top[i][[0, 0, 1, 2, 3, 5][i % 6]] for i in range(len(ds))]
    everything = build_dataset(flat_set)
    label_file = str(tmp / "labels.txt")
    with open(label_file, "w") as f:
        for i, path in enumerate(everything.paths):
            f.write(f"{os.path.splitext(path)[0]} {labels[i] if i < N_TIMM else 0}\n")
    ref1 = sum(labels[i] == top[i][0] for i in range(len(ds)))
    ref5 = sum(labels[i] in top[i][:5] for i in range(len(ds)))
    return "timm:" + name, weights, label_file, ref1, ref5


def test_timm_model_counts_equal_timms_own_loop(timm_reference, flat_set, tmp_path):
    from engine.evaluate import run_eval

    model, weights, label_file, ref1, ref5 = timm_reference
    assert 0 < ref1 < ref5 < N_TIMM
    cfg = resolve_config(model, data=flat_set, labels=label_file, weights=weights, backend="cpu", limit=N_TIMM,
                         batch_size=8, workers=2, progress=False, compute_only_iters=1,
                         json_path=str(tmp_path / "r.json"))
    out = io.StringIO()
    report, status = run_eval(cfg, out=out)
    assert status == 0
    assert (report["images"], report["correct_top1"], report["correct_top5"]) == (N_TIMM, ref1, ref5)
    saved = json.load(open(tmp_path / "r.json"))
    assert saved["config"]["preprocess"]["resize"] == 168 and saved["config"]["preprocess"]["crop"] == 160
    assert saved["backend"]["weights"] == weights and saved["preprocessing_check"]["sources"]["resize"] == "weights"
    assert "preprocessing from timm test_resnet.r160_in1k pretrained_cfg" in out.getvalue()


def test_timm_state_dict_that_does_not_fit(tmp_path):
    _timm()
    from engine.backends.base import BackendError
    from engine.models.zoo import build_timm

    path = str(tmp_path / "wrong.pth")
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(BackendError, match="does not fit --model timm:test_resnet"):
        build_timm("timm:test_resnet.r160_in1k", path)


def test_timm_without_weights_is_random_with_the_reason(capsys, monkeypatch):
    _timm()
    from engine.models import zoo
    from engine.models.zoo import build_timm

    huggingface_hub = pytest.importorskip("huggingface_hub")
    # an empty Hub cache (not by setting HF_HOME in-process: see tests/conftest.py on HF_HUB_OFFLINE)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo_id, filename, **kw: None)
    monkeypatch.setattr(zoo, "_warned", set())  # said once per process: this test wants to see it
    net, source = build_timm("timm:test_resnet.r160_in1k", None)
    assert source == "random"
    err = capsys.readouterr().err
    assert "using random weights" in err and "not in the Hugging Face Hub cache" in err


# ---- exported files carry their preprocessing ------------------------------------------------------

@pytest.fixture(scope="module")
def exported_v2(tmp_path_factory):
    """mobilenet_v2 random weights exported with IMAGENET1K_V2's preprocessing (TAG=FILE), and a file without a spec."""
    from engine.models.export import export_torchscript

    tmp = tmp_path_factory.mktemp("export_spec")
    torch.manual_seed(7)
    weights = str(tmp / "mnv2.pth")
    torch.save(torchvision.models.mobilenet_v2().state_dict(), weights)
    out = str(tmp / "mnv2.ts")
    info = export_torchscript(f"IMAGENET1K_V2={weights}", out, model="mobilenet_v2", size=64)
    plain = str(tmp / "plain.ts")
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(torchvision.models.mobilenet_v2().eval(), torch.zeros(1, 3, 64, 64)), plain)
    return out, plain, info


def test_export_stores_the_declared_spec(exported_v2):
    out, plain, info = exported_v2
    stored = catalog.read_file_spec(out)
    assert stored["model"] == "mobilenet_v2" and stored["tag"] == "IMAGENET1K_V2"
    assert stored["preprocess"]["resize"] == 232 and stored["published"]["top1"] == pytest.approx(72.154)
    assert catalog.read_file_spec(plain) is None
    cfg = resolve_config("resnext50_32x4d", ts=out)  # --model's declaration loses to the file's spec
    assert cfg.preprocess.resize == 232
    flags = resolve_config("resnext50_32x4d", {"crop": 200}, ts=out)
    assert (flags.preprocess.resize, flags.preprocess.crop) == (232, 200)
    assert resolve_config("inception_v3", ts=plain).preprocess.resize == 342  # no spec: --model's, assumed
    assert catalog.resolve("inception_v3", None, plain).source.startswith("assumed")


def test_run_eval_and_make_cache_on_an_exported_file_agree(exported_v2, folder_set, tmp_path):
    out, plain, _ = exported_v2
    rep = tmp_path / "r.json"
    cache = str(tmp_path / "pixels")
    r = run_cli([os.path.join(ROOT, "bin", "run-eval"), "--data", folder_set, "--ts", out, "--backend", "cpu",
                 "--limit", "8", "--batch-size", "4", "--workers", "1", "--compute-only-iters", "1",
                 "--no-progress", "--crop", "64", "--pixel-cache", cache, "--json", str(rep)])
    assert r.returncode == 0, r.stderr
    report = json.loads(rep.read_text())
    check = report["preprocessing_check"]
    assert check["sources"]["resize"] == "file" and check["sources"]["crop"] == "flag"
    assert report["published"]["top1"] == pytest.approx(72.154)
    assert "preprocessing from the spec stored in mnv2.ts" in r.stdout and "overridden by flags: crop" in r.stdout
    m = run_cli([os.path.join(ROOT, "bin", "make-cache"), "--data", folder_set, "--ts", out, "--limit", "8",
                 "--crop", "64", "--workers", "1", "--no-progress", "--pixel-cache", cache])
    assert m.returncode == 0, m.stderr
    assert "8 were cached, 0 decoded" in m.stdout, m.stdout  # the same key: make-cache --ts resolves the same spec
    assert "preprocessing of mobilenet_v2 (stored in the file)" in r.stdout
    r2 = run_cli([os.path.join(ROOT, "bin", "run-eval"), "--data", folder_set, "--ts", plain, "--backend", "cpu",
                  "--limit", "4", "--batch-size", "4", "--workers", "1", "--compute-only-iters", "1",
                  "--no-progress", "--crop", "64"])
    assert r2.returncode == 0, r2.stderr
    assert "preprocessing from assumed: plain.ts stores no preprocessing" in r2.stdout


# ---- the commands ---------------------------------------------------------------------------------

def test_weights_tag_on_the_command_line(folder_set, tmp_path):
    rep = tmp_path / "r.json"
    r = run_cli([os.path.join(ROOT, "bin", "run-eval"), "--data", folder_set, "--model", "mobilenet_v2",
                 "--weights", "IMAGENET1K_V2", "--backend", "sim", "--sim-batch-ms", "1", "--limit", "4",
                 "--batch-size", "4", "--no-progress", "--json", str(rep)])
    assert r.returncode == 0, r.stderr
    report = json.loads(rep.read_text())
    assert report["config"]["preprocess"]["resize"] == 232
    assert report["published"] == {"top1": 72.154, "top5": 90.822,
                                   "source": "torchvision MobileNet_V2_Weights.IMAGENET1K_V2.meta['_metrics']"
                                             "['ImageNet-1K']"}
    assert "published     72.154 / 90.822 (top-1 / top-5 %)" in r.stdout
    bad = run_cli([os.path.join(ROOT, "bin", "run-eval"), "--data", folder_set, "--model", "mobilenet_v2",
                   "--weights", "IMAGENET1K_V9", "--backend", "sim"])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("run-eval: error: --weights "
                                                                                 "IMAGENET1K_V9: mobilenet_v2 has no")


def test_list_models(tmp_path):
    r = run_cli([os.path.join(ROOT, "bin", "run-eval"), "--list-models", "resnext50*"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    v2 = [line for line in lines if line.startswith("resnext50_32x4d --weights IMAGENET1K_V2")]
    assert len(v2) == 1 and "resize 232 crop 224 bilinear" in v2[0] and "published top-1 81.198" in v2[0]
    none = run_cli([os.path.join(ROOT, "bin", "run-eval"), "--list-models", "no_such_model_anywhere"])
    assert none.returncode == 2 and "no model or weights tag matches" in none.stderr
    try:
        import timm  # noqa: F401
    except ImportError:
        return
    t = run_cli([os.path.join(ROOT, "bin", "run-eval"), "--list-models", "timm:resnext50_32x4d.a1h*"])
    assert t.returncode == 0 and "timm:resnext50_32x4d.a1h_in1k" in t.stdout and "resize 288 crop 288" in t.stdout


def test_timm_results_ship_in_the_package():
    """timm's results tables are package data (users have no ../shared), with their licence notice."""
    import configparser
    import glob

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    patterns = [p.strip() for p in cfg["options.package_data"]["engine"].split(",")]
    shipped = {os.path.relpath(f, os.path.join(ROOT, "engine")) for p in patterns
               for f in glob.glob(os.path.join(ROOT, "engine", p))}
    for key, _ in catalog.TIMM_RESULTS:
        assert f"data/timm-results/results-{key}.csv" in shipped
    assert "data/timm-results/NOTICE" in shipped
    assert "Apache License" in open(os.path.join(ROOT, "engine", "data", "timm-results", "NOTICE")).read()
    assert cfg["options.extras_require"]["timm"].split()[0].startswith("timm")


def test_a_tag_is_its_file_in_run_scores_fingerprint(folder_set, tmp_path):
    """--weights IMAGENET1K_V2 resolves to V2's file in torchvision's cache before the run: run.json
    holds that file's sha256, and a V1-tag run into the same --out is refused (two tags never share)."""
    import hashlib

    v2_name = os.path.basename(torchvision.models.get_model_weights("mobilenet_v2").IMAGENET1K_V2.url)
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.manual_seed(3)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), str(ckpt / v2_name))
    want = hashlib.sha256((ckpt / v2_name).read_bytes()).hexdigest()
    out = str(tmp_path / "scores")
    common = ["--data", folder_set, "--out", out, "--model", "mobilenet_v2", "--backend", "cpu", "--limit", "4",
              "--batch-size", "4", "--resize", "72", "--crop", "64", "--no-progress"]
    env = {"TORCH_HOME": str(tmp_path / "torch")}
    r = run_cli([os.path.join(ROOT, "bin", "run-score"), *common, "--weights", "IMAGENET1K_V2"], env=env)
    assert r.returncode == 0, r.stderr
    meta = json.load(open(os.path.join(out, "run.json")))
    assert meta["weights_sha256"] == want and meta["weights"] == "IMAGENET1K_V2"
    v1 = run_cli([os.path.join(ROOT, "bin", "run-score"), *common], env=env)  # V1: not in this cache, random
    assert v1.returncode == 2 and "weights_sha256" in v1.stderr, v1.stderr


def test_timm_weights_from_the_hub_cache(folder_set, tmp_path):
    """A tag's file in the Hugging Face Hub cache (its own layout: refs/main -> snapshots/REV/) is
    what runs, by its sha256, with no download."""
    _timm()
    pytest.importorskip("safetensors")
    import hashlib

    from safetensors.torch import save_file
    import timm

    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    torch.manual_seed(9)
    net = timm.create_model("test_resnet.r160_in1k", pretrained=False)
    path = repo / "snapshots" / rev / "model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    rep = tmp_path / "r.json"
    r = run_cli([os.path.join(ROOT, "bin", "run-eval"), "--data", folder_set, "--model", "timm/test_resnet.r160_in1k",
                 "--backend", "cpu", "--limit", "4", "--batch-size", "4", "--workers", "1", "--compute-only-iters", "1",
                 "--no-progress", "--json", str(rep)], env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    backend = json.loads(rep.read_text())["backend"]
    assert backend["weights"] == str(path) and "random" not in r.stderr
    assert backend["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_score_on_an_exported_file_uses_its_spec(exported_v2, folder_set, tmp_path):
    out_ts, _, _ = exported_v2
    out = str(tmp_path / "scores")
    r = run_cli([os.path.join(ROOT, "bin", "run-score"), "--data", folder_set, "--out", out, "--ts", out_ts,
                 "--backend", "cpu", "--limit", "4", "--batch-size", "4", "--crop", "64", "--no-progress"])
    assert r.returncode == 0, r.stderr
    meta = json.load(open(os.path.join(out, "run.json")))
    assert (meta["preprocessing"]["resize"], meta["preprocessing"]["crop"]) == (232, 64)  # the file's, a flag's


def test_export_a_timm_model_and_a_tag_without_a_file(timm_reference, tmp_path, monkeypatch):
    from engine.models.export import export_main

    model, weights, _, _, _ = timm_reference
    out = str(tmp_path / "t.ts")
    assert export_main([weights, out, "--model", model]) == 0
    stored = catalog.read_file_spec(out)
    assert (stored["family"], stored["model"], stored["preprocess"]["resize"], stored["preprocess"]["crop"]) == \
        ("timm", model, 168, 160)
    assert stored["input"] == [1, 3, 160, 160]
    # a tag whose file is neither in torchvision's cache (an empty one here) nor downloadable: no random export
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    err = io.StringIO()
    import contextlib

    with contextlib.redirect_stderr(err):
        assert export_main(["IMAGENET1K_V2", str(tmp_path / "x.ts"), "--model", "mobilenet_v2"]) == 2
    assert "export: error: IMAGENET1K_V2: no file for this tag" in err.getvalue()
    assert not os.path.exists(str(tmp_path / "x.ts"))

"""engine.synthetic and bin/make-dataset: deterministic, ImageNet-like, both layouts."""

from __future__ import annotations

import colorsys
import glob
import importlib.machinery
import importlib.util
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from engine.synthetic import (
    FILE_PATTERN,
    LABEL_FILE,
    _class_hue,
    _wnids,
    encode_jpeg,
    make_dataset,
    make_image,
    plan_dataset,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKE_DATASET = os.path.join(ROOT, "bin", "make-dataset")


def _files(root: str) -> dict:
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_same_seed_same_bytes_any_workers(tmp_path):
    # 32 images: enough for the process pool to be used.
    a = make_dataset(str(tmp_path / "a"), 32, 5, layout="flat", seed=3, workers=1)
    b = make_dataset(str(tmp_path / "b"), 32, 5, layout="flat", seed=3, workers=2)
    assert a == b
    files_a, files_b = _files(str(tmp_path / "a")), _files(str(tmp_path / "b"))
    assert files_a == files_b and len(files_a) == 33  # 32 images + val_label.txt
    c = make_dataset(str(tmp_path / "c"), 6, 5, layout="flat", seed=4, workers=1)
    files_c = _files(str(tmp_path / "c"))
    assert c != a[:6]
    assert all(files_c[name] != files_a[name] for name in files_c if name != LABEL_FILE)


def test_make_image_is_deterministic():
    one = make_image(np.random.default_rng(5), 120, 90, label=7)
    two = make_image(np.random.default_rng(5), 120, 90, label=7)
    assert one.mode == "RGB" and one.size == (120, 90)
    assert one.tobytes() == two.tobytes()
    assert make_image(np.random.default_rng(6), 120, 90, label=7).tobytes() != one.tobytes()


def test_size_distribution_like_imagenet_val():
    plan = plan_dataset(300, 10, seed=0)
    widths = np.array([p.width for p in plan])
    heights = np.array([p.height for p in plan])
    assert 450 <= np.median(widths) <= 550, np.median(widths)
    assert 333 <= np.median(heights) <= 400, np.median(heights)
    landscape = np.mean(widths > heights)
    assert 0.6 <= landscape <= 0.9, landscape
    assert np.mean(np.maximum(widths, heights) == 500) >= 0.6
    assert (np.maximum(widths, heights) > 1000).any(), "no image over 1000 px"
    assert (np.minimum(widths, heights) < 224).any(), "no image under 224 px on a side"
    assert (np.minimum(widths, heights) >= 16).all()
    # Other seeds, same shape of distribution.
    for seed in (1, 2):
        other = plan_dataset(200, 10, seed=seed)
        assert 450 <= np.median([p.width for p in other]) <= 550
        assert 333 <= np.median([p.height for p in other]) <= 400


def test_labels_balanced_and_mixed():
    plan = plan_dataset(100, 10, seed=0)
    labels = [p.label for p in plan]
    assert sorted(labels) == sorted(list(range(10)) * 10)
    assert labels != sorted(labels)
    assert [p.index for p in plan] == list(range(1, 101))


def test_special_kinds_present_and_encoded(tmp_path):
    plan = plan_dataset(200, 10, seed=0)
    assert sum(p.mode == "L" for p in plan) >= 1
    assert sum(p.mode == "CMYK" for p in plan) >= 1
    assert sum(p.progressive for p in plan) >= 1
    assert sum(p.mode == "RGB" and not p.progressive for p in plan) >= 150

    # A small dataset still has one of each; check the files really are so.
    items = make_dataset(str(tmp_path), 24, 4, layout="flat", seed=9, workers=1)
    plan = plan_dataset(24, 4, seed=9)
    seen = {"L": 0, "CMYK": 0, "progressive": 0}
    for (path, _label), spec in zip(items, plan):
        with Image.open(os.path.join(str(tmp_path), path)) as img:
            assert img.format == "JPEG"
            assert img.size == (spec.width, spec.height)
            assert img.mode == spec.mode
            assert bool(img.info.get("progressive")) == spec.progressive
            seen["L"] += img.mode == "L"
            seen["CMYK"] += img.mode == "CMYK"
            seen["progressive"] += bool(img.info.get("progressive"))
    assert all(seen.values()), seen


def test_folder_layout_is_an_imagefolder(tmp_path):
    root = str(tmp_path / "set")
    items = make_dataset(root, 30, 6, layout="folder", seed=1, workers=1)
    wnids = _wnids(6)
    assert wnids[0] == "n01440764"
    assert sorted(os.listdir(root)) == sorted(wnids)
    for index, (path, label) in enumerate(items, start=1):
        assert path == f"{wnids[label]}/{FILE_PATTERN % index}"
        assert os.path.isfile(os.path.join(root, path))
    datasets = pytest.importorskip("torchvision.datasets")
    folder = datasets.ImageFolder(root)
    assert folder.classes == wnids
    expected = sorted((os.path.join(root, p), label) for p, label in items)
    assert sorted(folder.samples) == expected


def test_folder_layout_needs_every_class(tmp_path):
    with pytest.raises(ValueError, match="flat"):
        make_dataset(str(tmp_path), 5, 10, layout="folder")


def test_flat_layout_and_label_file(tmp_path):
    root = str(tmp_path)
    items = make_dataset(root, 12, 1000, layout="flat", seed=2, workers=1)
    with open(os.path.join(root, LABEL_FILE), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) == 12
    for index, (line, (path, label)) in enumerate(zip(lines, items), start=1):
        assert re.fullmatch(r"ILSVRC2012_val_\d{8}\.JPEG \d+", line), line
        assert line == f"ILSVRC2012_val_{index:08d}.JPEG {label}"
        assert path == FILE_PATTERN % index and 0 <= label < 1000
    assert sorted(os.listdir(root)) == sorted([p for p, _ in items] + [LABEL_FILE])


def test_compresses_like_a_photo():
    sizes, correlations = [], []
    for i in range(8):
        img = make_image(np.random.default_rng([0, i]), 500, 375, label=i)
        sizes.append(len(encode_jpeg(img, 90)))
        luma = np.asarray(img.convert("L"), dtype=np.float64)
        correlations.append(np.corrcoef(luma[:, :-1].ravel(), luma[:, 1:].ravel())[0, 1])
    # About ImageNet's 100-150 KB for 500x375, and not white noise: neighbouring
    # pixels are strongly correlated, as in photographs (white noise: about 0).
    assert 70_000 <= float(np.median(sizes)) <= 180_000, sizes
    assert min(correlations) > 0.75, correlations


def test_class_hue_visible_in_the_centre():
    hits = total = 0
    for label in range(0, 1000, 37):
        for k in range(3):
            img = make_image(np.random.default_rng([label, k]), 160, 120, label, detail=0.5)
            centre = np.asarray(img, dtype=np.float64)[30:90, 40:120].reshape(-1, 3).mean(0) / 255
            hue = colorsys.rgb_to_hsv(*centre)[0]
            distance = abs(hue - _class_hue(label))
            hits += min(distance, 1 - distance) < 0.1
            total += 1
    assert hits / total >= 0.8, f"class hue visible in {hits}/{total} images"


def _load_script():
    loader = importlib.machinery.SourceFileLoader("make_dataset_script", MAKE_DATASET)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_cli_main_in_process(tmp_path, capsys):
    script = _load_script()
    out = str(tmp_path / "cli")
    argv = [out, "--images", "6", "--classes", "3", "--layout", "flat", "--seed", "1", "--quality", "80"]
    assert script.main(argv) == 0
    summary = capsys.readouterr().out.strip()
    assert re.match(r"make-dataset: 6 images, [\d.]+ MB, [\d.]+ s \(", summary), summary
    assert len(os.listdir(out)) == 7
    with pytest.raises(SystemExit):
        script.main([out, "--images", "2", "--classes", "3"])  # folder layout with an empty class


def test_cli_runs_as_a_script(tmp_path):
    assert os.access(MAKE_DATASET, os.X_OK), "bin/make-dataset must be executable"
    with open(MAKE_DATASET, encoding="utf-8") as f:
        assert f.readline().strip() == "#!/usr/bin/env python3"
    out = str(tmp_path / "script")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # it must find engine/ from the checkout by itself
    run = subprocess.run(
        [sys.executable, MAKE_DATASET, out, "--images", "4", "--classes", "2", "--seed", "5"],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env=env,
    )
    assert run.returncode == 0, run.stderr
    assert "make-dataset: 4 images" in run.stdout
    assert sorted(os.listdir(out)) == _wnids(2)


def test_jpeg_modes_round_trip():
    img = make_image(np.random.default_rng(1), 64, 48, 3)
    for mode in ("RGB", "L", "CMYK"):
        with Image.open(io.BytesIO(encode_jpeg(img, 90, mode))) as back:
            assert back.mode == mode

"""bench/bench_modelzoo_causes.py: its arithmetic, not its figures.

The mean of the script's Normalize is re-expressed for a model with its own normalisation: the
tensor a model normalising with ImageNet's mean/std computes from the re-expressed pixels must be
the script's tensor. The averaging (d) must reproduce acc_eval.py's loop: drop_last, the mean of
per-step percentages, a line every 100 steps.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transforms = pytest.importorskip("torchvision.transforms")
from PIL import Image  # noqa: E402

from conftest import ROOT, run_cli  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_modelzoo_causes as bench  # noqa: E402

from engine.config import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def test_the_model_sees_the_scripts_tensor():
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    m0 = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    s0 = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def imagenet_model(x: np.ndarray) -> np.ndarray:  # normalises as a model trained with ImageNet's mean/std
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 255.0
        return ((t - m0) / s0).flatten(1).numpy()

    script_mean = (0.485, 0.456, 0.06)
    got = bench.logits_of(imagenet_model, pixels, script_mean, batch=2)
    want = torch.stack([transforms.Normalize(script_mean, IMAGENET_STD)(transforms.ToTensor()(Image.fromarray(p)))
                        for p in pixels]).flatten(1).numpy()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    # the correct mean leaves the pixels as they are
    np.testing.assert_array_equal(bench.logits_of(imagenet_model, pixels, IMAGENET_MEAN), imagenet_model(pixels))


def test_script_figure_at_batch_1_is_the_count():
    hits = np.random.default_rng(1).random(250) < 0.7
    f = bench.script_figure(hits, 1)
    assert f["mean_of_steps"] == pytest.approx(f["counts"]) == pytest.approx(100.0 * hits.mean())
    assert (f["steps"], f["dropped_images"], f["printed_images"]) == (250, 0, 200)
    assert f["last_printed"] == pytest.approx(100.0 * hits[:200].mean())  # steps 201..250 never printed


def test_script_figure_at_a_larger_batch():
    # 10 images at batch 4: drop_last keeps 2 steps (8 images); without it the 2-image step weighs as 4
    hits = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0], bool)
    f = bench.script_figure(hits, 4)
    assert (f["steps"], f["dropped_images"], f["last_printed"], f["printed_images"]) == (2, 2, None, 0)
    assert f["counts"] == pytest.approx(50.0)
    assert f["mean_of_steps"] == pytest.approx(50.0)  # (100 + 0) / 2 over the 8 kept
    assert f["mean_of_steps_no_drop_last"] == pytest.approx((100 + 0 + 50) / 3)
    assert f["last_batch_no_drop_last"] == 2


def test_settings_cover_each_cause():
    assert bench.setting("") == {"resize": 256, "interpolation": "bilinear", "mean": IMAGENET_MEAN}
    assert bench.setting("abc") == {"resize": (256, 256), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.06)}
    assert bench.setting("c") == {"resize": 256, "interpolation": "bilinear", "mean": (0.485, 0.456, 0.06)}


def test_runs_end_to_end_with_the_proxy(tmp_path):
    from engine.synthetic import make_dataset

    make_dataset(str(tmp_path / "d"), 12, 3, layout="flat", seed=4)
    r = run_cli([os.path.join(ROOT, "bench", "bench_modelzoo_causes.py"), "--data", str(tmp_path / "d"),
                 "--proxy", "--batch", "5"])
    assert r.returncode == 0, r.stderr
    result = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    rows = {row["causes"]: row for row in result["rows"]}
    assert sorted(rows) == ["a", "ab", "abc", "ac", "b", "bc", "c", "none"]
    assert rows["none"]["top1_agreement"] == 100.0 and rows["none"]["top5_agreement"] == 100.0
    assert result["images"] == 12 and result["model"].startswith("proxy")
    assert [f["batch"] for f in result["averaging"]] == [1, 5]
    assert result["averaging"][1]["dropped_images"] == 2
    assert "(a)+(b)+(c): the preset" in r.stdout

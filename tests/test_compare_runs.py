"""Per-image rows (`run-eval --per-image`) and `bin/compare-runs`: the comparison of two runs over
the same synthetic images, checked against the rows read back independently (pyarrow, csv) and
scipy's binomial test; run-score's output accepted; mismatched runs refused with exit status 2."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch

from engine.config import resolve_config
from engine.evaluate import run_eval
from engine.pipeline.dataset import DatasetError
from engine.report.compare import CompareError, compare, labels_from_paths
from engine.report.perimage import PerImageError, read_rows
from tests.conftest import run_cli

pa = pytest.importorskip("pyarrow", reason="Parquet per-image files need pyarrow (the parquet extra)")
scipy_stats = pytest.importorskip("scipy.stats", reason="scipy is a test dependency (requirements-test.txt)")

N = 60
OWN = {"resize": 40, "crop": 32}
# the reference script's kind of mistakes, scaled down: a square resize, bicubic, a wrong mean
SCRIPT = {"resize": (40, 40), "crop": 32, "interpolation": "bicubic", "mean": (0.485, 0.456, 0.06)}


@pytest.fixture(scope="module")
def tiny_ts(folder_set, tmp_path_factory):
    """A TorchScript model fitted in a second to the synthetic classes' colours (their pixels encode
    the label as a hue), so both runs get some images right and the preprocessings disagree."""
    import torchvision
    from torchvision import transforms

    from engine.pipeline.dataset import build_dataset

    ds = build_dataset(folder_set)
    tf = transforms.Compose([transforms.Resize(40), transforms.CenterCrop(32), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    x = torch.stack([tf(torchvision.datasets.folder.pil_loader(ds.abspath(i))) for i in range(len(ds))])
    y = torch.from_numpy(ds.labels)
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 1000))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    path = str(tmp_path_factory.mktemp("cmp") / "fitted.ts")
    torch.jit.trace(net, torch.zeros(1, 3, 32, 32)).save(path)
    return path


def evaluate(data, ts, per_image, pre, **fields):
    cfg = resolve_config("resnet18", dict(pre), data=data, ts=ts, backend="cpu", batch_size=8, workers=1,
                         progress=False, compute_only_iters=1, per_image=per_image, **fields)
    return run_eval(cfg, out=open(os.devnull, "w"))


@pytest.fixture(scope="module")
def two_runs(folder_set, tiny_ts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    a, b = str(tmp / "own.parquet"), str(tmp / "script.csv")
    ra, sa = evaluate(folder_set, tiny_ts, a, OWN, limit=N)
    rb, sb = evaluate(folder_set, tiny_ts, b, SCRIPT, limit=N)
    assert sa == sb == 0
    return a, b, ra, rb


def _read_parquet(path):
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    return t.to_pydict(), json.loads(t.schema.metadata[b"imagenet_engine"])


def _read_csv(path):
    with open(path, newline="") as f:
        meta = json.loads(f.readline()[2:])
        rows = list(csv.DictReader(f))
    return rows, meta


def test_per_image_files_hold_the_runs_counts(two_runs):
    a, b, ra, rb = two_runs
    cols, meta = _read_parquet(a)
    assert meta["schema"] == "imagenet-engine.per-image" and meta["schema_version"] == 1
    assert meta["preprocessing"]["resize"] == 40 and meta["label_set"] == "imagenet"
    assert cols["id"] == list(range(N)) and len(set(cols["path"])) == N
    assert sum(cols["correct_top1"]) == ra["correct_top1"] and sum(cols["correct_top5"]) == ra["correct_top5"]
    for t, label, c1, c5 in zip(cols["topk_index"], cols["label"], cols["correct_top1"], cols["correct_top5"]):
        assert len(t) == 5 and c1 == (t[0] == label) and c5 == (label in t)
    assert all(s == os.path.getsize(os.path.join(meta["data"], p)) for p, s in zip(cols["path"], cols["size"]))
    rows, meta_b = _read_csv(b)
    assert meta_b["preprocessing"]["interpolation"] == "bicubic"
    assert sum(int(r["correct_top1"]) for r in rows) == rb["correct_top1"]
    assert [r["path"] for r in rows] == cols["path"]


def test_compare_equals_a_direct_count(two_runs):
    a, b, ra, rb = two_runs
    cols, _ = _read_parquet(a)
    rows, _ = _read_csv(b)
    ca = np.array(cols["correct_top1"], bool)
    cb = np.array([r["correct_top1"] == "1" for r in rows], bool)
    b_only, a_only = int((~ca & cb).sum()), int((ca & ~cb).sum())
    assert b_only + a_only > 0, "the two preprocessings should disagree on some images"
    rep = compare(read_rows(a), read_rows(b))
    assert rep["images"] == N and rep["left_out"] == 0
    assert (rep["a"]["correct_top1"], rep["b"]["correct_top1"]) == (ra["correct_top1"], rb["correct_top1"])
    assert (rep["a"]["correct_top5"], rep["b"]["correct_top5"]) == (ra["correct_top5"], rb["correct_top5"])
    assert (rep["right_in_b_only"], rep["right_in_a_only"]) == (b_only, a_only)
    assert rep["difference_top1"]["points"] == pytest.approx(100 * (b_only - a_only) / N)
    assert rep["mcnemar"]["p_value"] == pytest.approx(scipy_stats.binomtest(b_only, b_only + a_only, 0.5).pvalue,
                                                      rel=1e-9)
    assert len(rep["changed"]["right_in_b_only"]) == b_only
    top_a = np.array([t[0] for t in cols["topk_index"]])
    top_b = np.array([json.loads(r["topk_index"])[0] for r in rows])
    assert rep["top1_agreement"]["images"] == int((top_a == top_b).sum()) < N
    paths = np.array(cols["path"])
    assert sorted(paths[ca & ~cb].tolist()) == rep["changed"]["right_in_a_only"]
    labels = np.array(cols["label"])
    for c in rep["classes_moved"]:
        sel = labels == c["index"]
        assert c["change"] == int(cb[sel].sum()) - int(ca[sel].sum()) != 0
    # the same run against itself: nothing changed
    same = compare(read_rows(a), read_rows(a))
    assert same["right_in_b_only"] == same["right_in_a_only"] == 0 and same["mcnemar"]["p_value"] == 1.0


def test_compare_runs_command(two_runs, tmp_path):
    a, b, _, _ = two_runs
    out = str(tmp_path / "cmp.json")
    r = run_cli(["bin/compare-runs", a, b, "--json", out])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"Comparison of two runs on the same {N} images"
    assert any(line.startswith("  B - A        top-1 ") for line in lines)
    assert any("McNemar exact p = " in line for line in lines)
    rep = json.load(open(out))
    assert rep["images"] == N and "right_in_b_only" in rep["changed"]


def test_mismatched_runs_refused(two_runs, folder_set, tiny_ts, tmp_path):
    a, b, _, _ = two_runs
    fewer = str(tmp_path / "fewer.csv")
    assert evaluate(folder_set, tiny_ts, fewer, OWN, limit=N - 7)[1] == 0
    r = run_cli(["bin/compare-runs", a, fewer])
    assert r.returncode == 2 and r.stdout == ""
    assert "compare-runs: error: the runs are not over the same images: 7 only in A" in r.stderr
    assert r.stderr.count("\n") == 1
    # the same paths, one file of another size: not the same files
    rows, meta = _read_csv(b)
    rows[3]["size"] = str(int(rows[3]["size"]) + 1)
    edited = str(tmp_path / "edited.csv")
    with open(edited, "w", newline="") as f:
        f.write("# " + json.dumps(meta) + "\n")
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(CompareError, match="same path but a different size"):
        compare(read_rows(a), read_rows(edited))
    # other labels for the same images
    rows[3]["size"] = str(int(rows[3]["size"]) - 1)
    rows[5]["label"] = str((int(rows[5]["label"]) + 1) % 1000)
    with open(edited, "w", newline="") as f:
        f.write("# " + json.dumps(meta) + "\n")
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(CompareError, match="different labels"):
        compare(read_rows(a), read_rows(edited))
    r = run_cli(["bin/compare-runs", a, str(tmp_path / "nothing.parquet")])
    assert r.returncode == 2 and "no such file or folder" in r.stderr
    with pytest.raises(DatasetError, match="name it .parquet or .csv"):  # before the run: exit status 2
        evaluate(folder_set, tiny_ts, str(tmp_path / "rows.txt"), OWN, limit=2)


def test_failed_images_are_rows_with_an_error_and_left_out(folder_set, tiny_ts, tmp_path):
    data = tmp_path / "val"
    shutil.copytree(folder_set, data)
    victim = sorted(os.listdir(data / sorted(os.listdir(data))[0]))[0]
    first = data / sorted(os.listdir(data))[0] / victim
    first.write_bytes(b"not a jpeg")
    a, b = str(tmp_path / "a.parquet"), str(tmp_path / "b.csv")
    ra, status = evaluate(str(data), tiny_ts, a, OWN)
    assert status == 1 and ra["failed"] == 1
    # the statistics cover the 119 scored images only
    assert sum(r["images"] for r in ra["statistics"]["reliability"]) == ra["images"] == 119
    assert evaluate(str(data), tiny_ts, b, SCRIPT)[1] == 1
    cols, _ = _read_parquet(a)
    bad = [i for i, e in enumerate(cols["error"]) if e]
    assert len(bad) == 1 and cols["topk_index"][bad[0]] is None and cols["correct_top1"][bad[0]] is None
    assert len(cols["id"]) == 120
    rep = compare(read_rows(a), read_rows(b))
    assert rep["left_out"] == 1 and rep["images"] == 119 and rep["a"]["correct_top1"] == ra["correct_top1"]


def test_run_score_output_is_accepted(folder_set, tiny_ts, two_runs, tmp_path):
    """run-score over the same images with the same model and preprocessing: the labels come from
    the wnid folders, the sizes from its manifest, and nothing changes."""
    per = str(tmp_path / "eval.parquet")
    assert evaluate(folder_set, tiny_ts, per, OWN)[1] == 0
    out = str(tmp_path / "scored")
    r = run_cli(["bin/run-score", "--data", folder_set, "--out", out, "--ts", tiny_ts, "--backend", "cpu",
                 "--resize", "40", "--crop", "32", "--batch-size", "8", "--workers", "1", "--no-progress",
                 "--format", "csv", "--part-size", "50"])
    assert r.returncode == 0, r.stderr
    rows = read_rows(out)
    assert rows.kind == "run-score" and len(rows) == 120 and (rows.sizes > 0).all()
    rep = compare(read_rows(per), rows)
    assert rep["images"] == 120 and rep["right_in_a_only"] == rep["right_in_b_only"] == 0
    assert rep["a"]["correct_top1"] == rep["b"]["correct_top1"]
    # an unfinished run-score folder is refused
    os.unlink(os.path.join(out, "part-00001.done"))
    with pytest.raises(PerImageError, match="1 of 3 parts are done|2 of 3 parts are done"):
        read_rows(out)


def test_labels_from_paths():
    got = labels_from_paths(["n01440764/a.JPEG", "7/b.JPEG", "c.JPEG", "cat/d.JPEG", "012/e.JPEG"])
    assert got.tolist() == [0, 7, -1, -1, -1]

"""Label sets (engine/report/labelsets.py) against a plain reference loop on synthetic images:
ReaL counted on a hand-built real.json, the ImageNet-A/R 200-class restriction against a loop that
masks the logits itself, ImageNet-V2's numbered folders, --class-map, and the refusals."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from engine.classes import wnid_to_index
from engine.config import resolve_config
from engine.evaluate import run_eval
from engine.pipeline.dataset import DatasetError, build_dataset
from engine.report import labelsets
from tests.conftest import run_cli

N = 60
SMALL = {"resize": 40, "crop": 32}
RANKS = [0, 0, 1, 2, 3, 4, 5, 5, 5]  # rank of the label among the reference's choices, by image


@pytest.fixture(scope="module")
def tiny(folder_set, tmp_path_factory):
    """A TorchScript model with 1000 outputs, and its logits on torchvision's preprocessing of the
    first N images of folder_set (by file name)."""
    import torchvision
    from torchvision import transforms

    tmp = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(7)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(64, 1000)).eval()
    ts = str(tmp / "tiny.ts")
    torch.jit.trace(net, torch.zeros(1, 3, 32, 32)).save(ts)
    ds = build_dataset(folder_set, limit=N)
    tf = transforms.Compose([transforms.Resize(40), transforms.CenterCrop(32), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with torch.inference_mode():
        x = torch.stack([tf(torchvision.datasets.folder.pil_loader(ds.abspath(i))) for i in range(len(ds))])
        logits = net(x).numpy().astype(np.float64)
    return ts, ds, logits


def evaluate(data, ts, tmp_path, **fields):
    cfg = resolve_config("resnet18", dict(SMALL), data=data, ts=ts, backend="cpu", batch_size=8, workers=1,
                         progress=False, compute_only_iters=1, **fields)
    report, status = run_eval(cfg, out=open(os.devnull, "w"))
    assert status == 0
    return report


def ranked(logits, mask=None):
    """Classes best first per image, in a plain loop (masked classes never chosen)."""
    out = []
    for row in logits:
        order = [int(c) for c in np.argsort(-row, kind="stable") if mask is None or mask[c]]
        out.append(order)
    return out


# -- ReaL ----------------------------------------------------------------------------------------
def test_real_counter_hand_computed():
    lists = [[], [3], [3, 4], [7], [1, 2], []]
    topk = np.array([[3, 0, 0, 0, 0], [3, 1, 1, 1, 1], [4, 3, 0, 0, 0], [1, 2, 3, 4, 5], [9, 8, 7, 6, 2],
                     [1, 1, 1, 1, 1]])
    rc = labelsets.RealCounter(lists, "real.json")
    rc.update(topk[:3], np.array([0, 1, 2]))
    rc.update(topk[3:], np.array([3, 4, 5]))
    # images 0 and 5 are left out (empty lists); top-1 right: 1 (3 in [3]), 2 (4 in [3, 4]);
    # top-5: those two and 4 (2 in [1, 2] at rank 5); image 3's 7 is nowhere in its five
    rep = rc.report()
    assert (rep["images"], rep["correct"], rep["correct_top5"]) == (4, 2, 3)
    assert rep["accuracy"] == 50.0 and rep["accuracy_top5"] == 75.0


def test_real_labels_in_a_run(tiny, folder_set, tmp_path):
    ts, ds, logits = tiny
    ref = ranked(logits)
    ids = labelsets.val_ids(ds)
    real = [[] for _ in range(int(ids.max()) + 1)]
    want_images = want1 = want5 = 0
    for i, vid in enumerate(ids.tolist()):
        kind = i % 4
        if kind == 0:
            continue  # left out of ReaL
        want_images += 1
        if kind == 1:  # its top-1 among two labels
            real[vid] = [ref[i][7], ref[i][0]]
            want1 += 1
            want5 += 1
        elif kind == 2:  # its 3rd choice: wrong at top-1, right at top-5
            real[vid] = [ref[i][2]]
            want5 += 1
        else:  # nothing it ranks in its five
            real[vid] = [ref[i][6], ref[i][9]]
    path = str(tmp_path / "real.json")
    with open(path, "w") as f:
        json.dump(real, f)
    report = evaluate(folder_set, ts, tmp_path, limit=N, real_labels=path)
    r = report["real"]
    assert (r["images"], r["correct"], r["correct_top5"]) == (want_images, want1, want5)
    assert r["accuracy"] == pytest.approx(100 * want1 / want_images)
    # the original labels are still the primary figures, beside ReaL
    assert report["images"] == N and report["correct_top1"] == sum(
        ref[i][0] == int(ds.labels[i]) for i in range(N))


def test_packaged_real_json_is_the_shared_copy():
    real = labelsets.load_real(labelsets.REAL_PACKAGED)
    assert len(real) == 50_000 and sum(1 for r in real if not r) == 3163
    assert real[1] == [970, 795]


def test_real_refused_without_val_file_names(folder_set, tmp_path):
    data = tmp_path / "renamed"
    src = build_dataset(folder_set, limit=4)
    for i, p in enumerate(src.paths):
        os.makedirs(data / os.path.dirname(p), exist_ok=True)
        shutil.copy(src.abspath(i), data / os.path.dirname(p) / f"photo_{i}.jpg")
    r = run_cli(["bin/run-eval", "--data", str(data), "--backend", "cpu", "--real-labels", "--no-progress",
                 "--model", "resnet18", "--resize", "40", "--crop", "32"])
    assert r.returncode == 2, r.stderr
    assert "--real-labels needs ImageNet val file names" in r.stderr and "photo_" in r.stderr
    assert r.stderr.count("\n") == 1


# -- ImageNet-A / -R: the 200-class restriction --------------------------------------------------
def _subset_set(root, ds, logits, name):
    """The N images in `name`'s 200 wnid folders, each labelled by the masked reference at RANKS."""
    table = wnid_to_index()
    wnids = labelsets.subset_wnids(name)
    mask = np.zeros(1000, bool)
    mask[[table[w] for w in wnids]] = True
    ref = ranked(logits, mask)
    index_to_wnid = {v: k for k, v in table.items()}
    for w in wnids:
        os.makedirs(os.path.join(root, w), exist_ok=True)
    labels = []
    for i in range(len(ds)):
        label = ref[i][RANKS[i % len(RANKS)]]
        labels.append(label)
        shutil.copy(ds.abspath(i), os.path.join(root, index_to_wnid[label], os.path.basename(ds.paths[i])))
    return mask, np.array(labels)


@pytest.mark.parametrize("name", ["imagenet-a", "imagenet-r"])
def test_200_class_restriction_equals_masked_reference_loop(tiny, tmp_path, name):
    ts, ds, logits = tiny
    root = str(tmp_path / name)
    mask, labels = _subset_set(root, ds, logits, name)
    order = {os.path.basename(p): i for i, p in enumerate(ds.paths)}
    masked, full = ranked(logits, mask), ranked(logits)

    def counts(ref, run_ds):
        idx = [order[os.path.basename(p)] for p in run_ds.paths]
        lab = [labels[i] for i in idx]
        return (sum(ref[i][0] == c for i, c in zip(idx, lab)), sum(c in ref[i][:5] for i, c in zip(idx, lab)))

    run_ds = build_dataset(root)
    want1, want5 = counts(masked, run_ds)
    assert 0 < want1 < want5 < N
    report = evaluate(root, ts, tmp_path)
    assert (report["correct_top1"], report["correct_top5"]) == (want1, want5)
    assert report["label_set"]["name"] == name and report["label_set"]["restricted_to"] == 200
    assert "restricted to" in report["label_set"]["note"]
    # --class-subset none: all 1,000 outputs compete, as an unmasked loop counts
    report = evaluate(root, ts, tmp_path, class_subset="none")
    assert (report["correct_top1"], report["correct_top5"]) == counts(full, run_ds)
    assert report["label_set"]["restricted_to"] is None


def test_auto_leaves_other_sets_alone_and_present_restricts(tiny, folder_set, tmp_path):
    ts, ds, logits = tiny
    report = evaluate(folder_set, ts, tmp_path, limit=N)
    ref = ranked(logits)
    assert report["correct_top5"] == sum(int(ds.labels[i]) in ref[i][:5] for i in range(N))
    assert report["label_set"]["name"] == "imagenet" and report["label_set"]["restricted_to"] is None
    present = np.zeros(1000, bool)
    present[np.unique(ds.labels)] = True
    ref_p = ranked(logits, present)
    report = evaluate(folder_set, ts, tmp_path, limit=N, class_subset="present")
    assert report["correct_top1"] == sum(int(ds.labels[i]) == ref_p[i][0] for i in range(N))
    assert report["label_set"]["restricted_to"] == len(np.unique(ds.labels))


def test_restrict_sets_minus_inf_and_keeps_the_input():
    logits = np.arange(12, dtype=np.float16).reshape(2, 6)
    mask = np.array([True, False, True, False, False, False])
    out = labelsets.restrict(logits, mask)
    assert out.dtype == np.float32 and np.isneginf(out[:, ~mask]).all() and (out[:, mask] == logits[:, mask]).all()
    assert np.isfinite(logits).all()
    assert labelsets.restrict(logits, None) is logits


# -- ImageNet-V2, Sketch, other folders ----------------------------------------------------------
def test_v2_numbered_folders_map_by_number(tiny, tmp_path):
    ts, ds, logits = tiny
    root = tmp_path / "v2"
    ref = ranked(logits)
    # labels from the reference's choices, written as folder numbers: 10 sorts before 2 as a name
    labels = [ref[i][RANKS[i % len(RANKS)]] for i in range(len(ds))]
    for i, label in enumerate(labels):
        os.makedirs(root / str(label), exist_ok=True)
        shutil.copy(ds.abspath(i), root / str(label) / os.path.basename(ds.paths[i]))
    os.makedirs(root / "2", exist_ok=True)
    os.makedirs(root / "10", exist_ok=True)
    built = build_dataset(str(root))
    for p, label in zip(built.paths, built.labels.tolist()):
        assert int(p.split(os.sep)[0]) == label
    report = evaluate(str(root), ts, tmp_path)
    assert report["label_set"]["name"] == "imagenet-v2"
    assert report["correct_top1"] == sum(ref[i][0] == labels[i] for i in range(len(ds)))
    assert report["correct_top5"] == sum(labels[i] in ref[i][:5] for i in range(len(ds)))


def test_numbered_folders_beyond_the_model_are_refused(tmp_path, folder_set):
    src = build_dataset(folder_set, limit=1)
    os.makedirs(tmp_path / "1000")
    shutil.copy(src.abspath(0), tmp_path / "1000" / "a.JPEG")
    with pytest.raises(DatasetError, match="class folder 1000 is not below the model's 1000 classes"):
        build_dataset(str(tmp_path))
    assert labelsets.numbered(["0", "2", "10"]) and not labelsets.numbered(["01", "2"])
    assert not labelsets.numbered(["n01440764"])


def test_sketch_and_other_sets_detected(tmp_path, folder_set):
    src = build_dataset(folder_set, limit=2)
    sketch = tmp_path / "sketch"
    for w in wnid_to_index():
        os.makedirs(sketch / w)
    shutil.copy(src.abspath(0), sketch / "n01440764" / "sketch_0.JPEG")
    assert labelsets.detect(build_dataset(str(sketch))) == "imagenet-sketch"
    other = tmp_path / "other"
    os.makedirs(other / "cat")
    shutil.copy(src.abspath(1), other / "cat" / "x.JPEG")
    assert labelsets.detect(build_dataset(str(other))) == "other"
    assert labelsets.detect(build_dataset(folder_set)) == "imagenet"


# -- --class-map ---------------------------------------------------------------------------------
def test_class_map_relabels_folders(tiny, tmp_path):
    ts, ds, logits = tiny
    ref = ranked(logits)
    root = tmp_path / "pets"
    names = ["cat", "dog", "fish"]
    for i in range(len(ds)):
        os.makedirs(root / names[i % 3], exist_ok=True)
        shutil.copy(ds.abspath(i), root / names[i % 3] / os.path.basename(ds.paths[i]))
    order = {os.path.basename(p): i for i, p in enumerate(ds.paths)}
    table = {v: k for k, v in wnid_to_index().items()}
    # each folder mapped to the reference's top-1 of its first image: a wnid for one, numbers for two
    first = {n: ref[i][0] for i, n in ((i, names[i % 3]) for i in (0, 1, 2))}
    cmap = tmp_path / "map.txt"
    cmap.write_text(f"# folder class\ncat {table[first['cat']]}\ndog {first['dog']}\nfish {first['fish']}\n")
    report = evaluate(str(root), ts, tmp_path, class_map=str(cmap))
    built = build_dataset(str(root))
    want = sum(ref[order[os.path.basename(p)]][0] == first[p.split(os.sep)[0]] for p in built.paths)
    assert report["correct_top1"] == want >= 3
    assert report["label_set"]["name"] == "class-map"
    cmap.write_text("cat 1\ndog 2\n")
    with pytest.raises(labelsets.LabelSetError, match="no line for 1 class"):
        evaluate(str(root), ts, tmp_path, class_map=str(cmap))
    cmap.write_text("cat n99999999\n")
    with pytest.raises(labelsets.LabelSetError, match="neither a class index nor an ImageNet wnid"):
        evaluate(str(root), ts, tmp_path, class_map=str(cmap))


# -- published figures ---------------------------------------------------------------------------
def test_published_for_reads_timm_tables():
    fig = labelsets.published_for("resnext50_32x4d", "imagenet-a")  # torchvision's V1 weights, as timm lists them
    assert (fig["tag"], fig["img_size"], fig["top1"], fig["top5"]) == ("resnext50_32x4d.tv_in1k", 224, 4.68, 29.84)
    assert labelsets.published_for("resnet50", "imagenet-a") is None  # not in that table
    with open(os.path.join(labelsets.TIMM_DIR, "results-imagenet-real.csv")) as f:
        row = next(line for line in f if line.startswith("resnet50.tv_in1k,"))
    assert labelsets.published_for("resnet50", "real")["top1"] == float(row.split(",")[2])
    assert labelsets.published_for("resnext50_32x4d.a1h_in1k", "imagenet", 288)["top1"] == 82.016
    assert labelsets.published_for("resnext50_32x4d.a1h_in1k", "imagenet", 224)["top1"] == 81.140
    assert labelsets.published_for("no_such_model", "imagenet") is None
    assert labelsets.published_for("resnet50", "other") is None


def test_flags_become_config_fields():
    from engine.cli import config_from_args, eval_parser

    p = eval_parser()
    a = p.parse_args(["--data", "x", "--real-labels", "--class-subset", "present", "--class-map", "m.txt",
                      "--per-image", "rows.csv", "--backend", "cpu"])
    r = config_from_args(a).report  # the flags, named like their options, go to the report section
    assert (r.real_labels, r.class_subset, r.class_map, r.per_image) == (
        labelsets.REAL_PACKAGED, "present", "m.txt", "rows.csv")
    a = p.parse_args(["--data", "x", "--real-labels", "mine.json", "--backend", "cpu"])
    r = config_from_args(a).report
    assert (r.real_labels, r.class_subset, r.class_map, r.per_image) == ("mine.json", "auto", None, None)
    r = run_cli(["bin/run-eval", "--data", "x", "--class-subset", "some"])
    assert r.returncode == 2 and "invalid choice: 'some'" in r.stderr

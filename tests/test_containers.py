"""Data where it lives: a tar of images, WebDataset shards, Parquet shards (engine/pipeline/containers/).

The same synthetic images are written as a folder, a flat tar with val_label.txt, a tar of class
folders, WebDataset shards and Parquet shards; every layout must give the same images in the same
order with the same labels, the same bytes through the workers' reader, the same logits through
the pool, and the same counts through run-eval. Then each bad-input case, the tar index cache,
the pixel cache's keys, run-score's names, the devkit labels and make-dataset's containers.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest

from engine.pipeline.containers.write import convert, items_of, write_parquet, write_tar, write_wds
from engine.pipeline.dataset import DatasetError, build_dataset, build_unlabelled
from preprocess.containers import ByteReader
from tests.conftest import ROOT, run_cli

pa = pytest.importorskip("pyarrow")  # the Parquet layout (and its tests) need the parquet extra

EVAL = os.path.join(ROOT, "bin", "run-eval")
SCORE = os.path.join(ROOT, "bin", "run-score")
MAKE = os.path.join(ROOT, "bin", "make-dataset")
N, CLASSES = 40, 5


@pytest.fixture(scope="module")
def index_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("index-cache"))


@pytest.fixture(autouse=True)
def own_cache(index_cache, monkeypatch):
    """Tar indexes (and pixel caches) of these tests go to a folder of their own, not ~/.cache."""
    monkeypatch.setenv("IMAGENET_ENGINE_CACHE", index_cache)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """{layout: (--data, --labels)} for the same 40 images (5 classes) in every layout."""
    from engine.synthetic import make_dataset

    base = tmp_path_factory.mktemp("containers")
    folder = str(base / "folder")
    make_dataset(folder, N, CLASSES, layout="folder", seed=5, workers=1)
    flat = str(base / "flat")
    make_dataset(flat, N, CLASSES, layout="flat", seed=5, workers=1)
    convert(flat, str(base / "tar"), "tar")
    convert(folder, str(base / "tarfolder"), "tar")
    ds = build_dataset(folder)
    write_wds(items_of(ds), str(base / "wds"), shard_size=15)
    write_parquet(items_of(ds), str(base / "parquet"), shard_size=16, row_group=5)
    return {
        "folder": (folder, None),
        "tar": (str(base / "tar" / "ILSVRC2012_img_val.tar"), str(base / "tar" / "val_label.txt")),
        "tarfolder": (str(base / "tarfolder" / "ILSVRC2012_img_val.tar"), None),
        "wds": (str(base / "wds"), None),
        "wds-pattern": (str(base / "wds" / "val-{000000..000002}.tar"), None),
        "wds-list": ("::".join(str(base / "wds" / f"val-{k:06d}.tar") for k in range(3)), None),
        "parquet": (str(base / "parquet"), None),
        "parquet-glob": (str(base / "parquet" / "validation-*.parquet"), None),
    }


LAYOUTS = ["tar", "tarfolder", "wds", "wds-pattern", "wds-list", "parquet", "parquet-glob"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_images_order_labels_and_bytes(sets, layout):
    ref = build_dataset(*sets["folder"])
    ds = build_dataset(*sets[layout])
    assert len(ds) == len(ref) == N
    np.testing.assert_array_equal(ds.labels, ref.labels)
    assert ds.class_names == ref.class_names
    assert ds.container is not None and ref.container is None
    reader = ByteReader()
    for i in range(N):
        with open(ref.abspath(i), "rb") as f:
            assert reader.read(ds.locator(i)) == f.read(), (layout, i, ds.paths[i])
    reader.close()
    stem = os.path.splitext(os.path.basename(ref.paths[0]))[0]
    first = {"tar": "ILSVRC2012_img_val.tar:" + os.path.basename(ref.paths[0]),
             "tarfolder": "ILSVRC2012_img_val.tar:" + ref.paths[0],
             "parquet": "validation-00000-of-00003.parquet:0"}.get(layout.split("-")[0], "val-000000.tar:" + stem)
    assert ds.paths[0] == first
    assert build_dataset(*sets[layout], limit=7).paths == ds.paths[:7]


def test_parquet_names_rows_by_position_in_the_file(sets):
    ds = build_dataset(*sets["parquet"])
    assert ds.paths[16] == "validation-00001-of-00003.parquet:0"
    assert ds.paths[23] == "validation-00001-of-00003.parquet:7"
    loc = ds.locator(23)
    assert loc[0] == "parquet" and (loc[2], loc[3]) == (1, 2)  # row group 1 (of 5 rows), row 2


@pytest.mark.parametrize("layout", ["tar", "wds", "parquet"])
def test_pool_gives_the_folders_logits(sets, layout):
    """The decode pool over a container: every image once, pixels identical to the folder's."""
    from tests.test_pipeline import run_direct

    ref, _, _ = run_direct(build_dataset(*sets["folder"]), batch_size=8, workers=2, sim_batch_ms=1.0)
    got, _, _ = run_direct(build_dataset(*sets[layout]), batch_size=8, workers=2, sim_batch_ms=1.0)
    assert sorted(got) == list(range(N))
    for i in range(N):
        assert got[i][0] and ref[i][0]
        np.testing.assert_array_equal(got[i][1], ref[i][1])
        assert got[i][2] == ref[i][2]


def make_hue_model(path: str) -> str:
    """A TorchScript model that scores the synthetic classes by their hue (so counts are not zero)."""
    torch = pytest.importorskip("torch")
    from engine.synthetic import _class_hue, _hsv

    cols = np.stack([_hsv(_class_hue(c), 0.7, 0.8) / 255.0 for c in range(CLASSES)])
    cols = (cols - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    w = torch.full((3, 1000), 0.0)
    w[:, :CLASSES] = torch.tensor(cols.T, dtype=torch.float32)

    class Hue(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", w)

        def forward(self, x):
            return x.mean(dim=(2, 3)) @ self.w

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice on the main stack
        torch.jit.trace(Hue(), torch.zeros(1, 3, 56, 56)).save(path)
    return path


@pytest.fixture(scope="module")
def hue_model(tmp_path_factory):
    return make_hue_model(str(tmp_path_factory.mktemp("hue") / "hue.ts"))


def _eval(data, labels, model, out, *extra):
    args = [EVAL, "--data", data, "--ts", model, "--backend", "cpu", "--resize", "64", "--crop", "56",
            "--batch-size", "8", "--workers", "2", "--no-progress", "--json", str(out)] + list(extra)
    if labels:
        args += ["--labels", labels]
    return run_cli(args)


def test_run_eval_counts_identical_across_layouts(sets, hue_model, tmp_path):
    counts = {}
    for layout in ("folder", "tar", "wds", "parquet"):
        for limit in (None, "13"):
            out = tmp_path / f"{layout}-{limit}.json"
            r = _eval(*sets[layout], hue_model, out, *(["--limit", limit] if limit else []))
            assert r.returncode == 0, r.stderr
            rep = json.loads(out.read_text())
            counts[layout, limit] = (rep["images"], rep["failed"], rep["correct_top1"], rep["correct_top5"])
    assert counts["folder", None][0] == N and counts["folder", "13"][0] == 13
    assert 0 < counts["folder", None][2] < N  # the model is right on some images, not all: counts can differ
    for layout in ("tar", "wds", "parquet"):
        assert counts[layout, None] == counts["folder", None], layout
        assert counts[layout, "13"] == counts["folder", "13"], layout


# -- bad input ------------------------------------------------------------------------------------
def _flat_items(sets):
    ds = build_dataset(*sets["folder"])
    return ds, items_of(ds)


def test_truncated_tar_fails_the_cut_member_and_scores_the_rest(sets, tmp_path):
    src, labels = sets["tar"]
    data = open(src, "rb").read()
    ds = build_dataset(src, labels)
    cut = int(ds.container.a[5]) + int(ds.container.b[5]) // 2  # inside the 6th image's bytes
    bad = tmp_path / "cut.tar"
    bad.write_bytes(data[:cut])
    cut_ds = build_dataset(str(bad), labels)  # warns that the label file names images the tar lost
    assert len(cut_ds) == 6
    out = tmp_path / "r.json"
    r = run_cli([EVAL, "--data", str(bad), "--labels", labels, "--backend", "sim", "--sim-batch-ms", "1",
                 "--batch-size", "4", "--workers", "2", "--no-progress", "--json", str(out)])
    assert r.returncode == 1, r.stderr  # an image failed
    rep = json.loads(out.read_text())
    assert (rep["images"], rep["failed"]) == (5, 1)
    assert rep["failures"][0]["path"] == cut_ds.paths[5]
    assert "truncated" in rep["failures"][0]["reason"]
    assert "not in" in r.stderr  # the label lines of the lost members


def test_member_that_is_not_an_image_and_a_link_are_failed(sets, tmp_path):
    ds, items = _flat_items(sets)
    path = tmp_path / "mixed.tar"
    write_tar(items[:6], str(path))
    with tarfile.open(path, "a") as tf:
        text = b"this is not an image\n"
        info = tarfile.TarInfo("zz_text.JPEG")
        info.size = len(text)
        tf.addfile(info, io.BytesIO(text))
        link = tarfile.TarInfo("zz_link.JPEG")
        link.type = tarfile.SYMTYPE
        link.linkname = items[0][1]
        tf.addfile(link)
        readme = tarfile.TarInfo("README")  # not an image name: not listed
        readme.size = 2
        tf.addfile(readme, io.BytesIO(b"hi"))
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{n} {l}\n" for _, n, l in items[:6]) + "zz_text.JPEG 1\nzz_link.JPEG 2\n")
    out = tmp_path / "r.json"
    r = run_cli([EVAL, "--data", str(path), "--labels", str(labels), "--backend", "sim", "--sim-batch-ms", "1",
                 "--batch-size", "4", "--workers", "1", "--no-progress", "--json", str(out)])
    assert r.returncode == 1, r.stderr
    rep = json.loads(out.read_text())
    assert (rep["images"], rep["failed"]) == (6, 2)
    reasons = {f["path"]: f["reason"] for f in rep["failures"]}
    assert set(reasons) == {"mixed.tar:zz_text.JPEG", "mixed.tar:zz_link.JPEG"}
    assert "regular file" in reasons["mixed.tar:zz_link.JPEG"]


def test_parquet_null_and_corrupt_rows_are_failed(sets, tmp_path):
    import pyarrow.parquet as pq

    ds, items = _flat_items(sets)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"bytes": open(p, "rb").read(), "path": n} for p, n, _ in items[:6]]
    rows[2] = {"bytes": None, "path": "null.JPEG"}
    rows[3] = {"bytes": os.urandom(3000), "path": "noise.JPEG"}
    rows[4] = None  # a null struct
    table = pa.Table.from_arrays([pa.array(rows, type=image_type), pa.array([l for *_, l in items[:6]], pa.int64())],
                                 names=["image", "label"])
    path = tmp_path / "validation-00000-of-00001.parquet"
    pq.write_table(table, str(path), row_group_size=4)
    out = tmp_path / "r.json"
    r = run_cli([EVAL, "--data", str(path), "--backend", "sim", "--sim-batch-ms", "1", "--batch-size", "4",
                 "--workers", "2", "--no-progress", "--json", str(out)])
    assert r.returncode == 1, r.stderr
    rep = json.loads(out.read_text())
    assert (rep["images"], rep["failed"]) == (3, 3)
    reasons = {f["path"]: f["reason"] for f in rep["failures"]}
    name = "validation-00000-of-00001.parquet"
    assert set(reasons) == {f"{name}:2", f"{name}:3", f"{name}:4"}
    assert "null" in reasons[f"{name}:2"] and "null" in reasons[f"{name}:4"]


@pytest.mark.parametrize("kind", ["wds", "parquet"])
def test_a_shard_that_cannot_be_opened_is_a_failed_image(sets, tmp_path, kind):
    src = sets[kind][0]
    shutil.copytree(src, tmp_path / "s")
    names = sorted(os.listdir(tmp_path / "s"))
    (tmp_path / "s" / names[1]).write_bytes(b"garbage, not a container" * 100)
    out = tmp_path / "r.json"
    r = run_cli([EVAL, "--data", str(tmp_path / "s"), "--backend", "sim", "--sim-batch-ms", "1", "--batch-size",
                 "8", "--workers", "2", "--no-progress", "--json", str(out)])
    assert r.returncode == 1, r.stderr
    rep = json.loads(out.read_text())
    assert rep["failed"] == 1
    assert rep["failures"][0]["path"] == names[1]
    assert "cannot be opened" in rep["failures"][0]["reason"]
    scored = N - (15 if kind == "wds" else 16)
    assert rep["images"] == scored


def test_wds_missing_or_bad_labels_are_refused_before_the_run(sets, tmp_path):
    ds, items = _flat_items(sets)
    write_wds([(p, n, l if k != 3 else -1) for k, (p, n, l) in enumerate(items[:8])], str(tmp_path / "a"))
    with pytest.raises(DatasetError, match="no label.*ILSVRC2012_val_00000004"):
        build_dataset(str(tmp_path / "a"))
    build_unlabelled(str(tmp_path / "a"))  # scoring needs no labels
    write_wds([(p, n, l if k != 2 else 1000) for k, (p, n, l) in enumerate(items[:8])], str(tmp_path / "b"))
    with pytest.raises(DatasetError, match="outside the model's 1000 classes.*ILSVRC2012_val_00000003 has 1000"):
        build_dataset(str(tmp_path / "b"))
    r = run_cli([EVAL, "--data", str(tmp_path / "b"), "--backend", "sim", "--workers", "1", "--no-progress"])
    assert r.returncode == 2 and "outside the model's 1000 classes" in r.stderr and "Traceback" not in r.stderr


def test_flat_tar_without_labels_and_labels_out_of_range_are_refused(sets, tmp_path):
    src, labels = sets["tar"]
    with pytest.raises(DatasetError, match="give --labels"):
        build_dataset(src)
    bad = tmp_path / "labels.txt"
    bad.write_text(open(labels).read().replace(" 3\n", " 1003\n", 1))
    with pytest.raises(DatasetError, match="outside the model's 1000 classes"):
        build_dataset(src, str(bad))
    short = tmp_path / "short.txt"
    short.write_text("".join(open(labels).readlines()[1:]))
    with pytest.raises(DatasetError, match="1 image.*have no line in --labels.*ILSVRC2012_val_00000001"):
        build_dataset(src, str(short))


def test_compressed_tar_and_train_tar_are_refused_with_what_to_do(sets, tmp_path):
    import gzip

    src, _ = sets["tar"]
    gz = tmp_path / "val.tar.gz"
    gz.write_bytes(gzip.compress(open(src, "rb").read()))
    with pytest.raises(DatasetError, match="compressed tar.*decompress"):
        build_dataset(str(gz))
    disguised = tmp_path / "val.tar"
    shutil.copy(gz, disguised)
    with pytest.raises(DatasetError, match="gzip-compressed tar.*gunzip -k"):
        build_dataset(str(disguised))
    inner = tmp_path / "n01440764.tar"
    shutil.copy(src, inner)
    train = tmp_path / "train.tar"
    with tarfile.open(train, "w") as tf:
        tf.add(str(inner), arcname="n01440764.tar")
    with pytest.raises(DatasetError, match="tar of tars.*class folders"):
        build_dataset(str(train))
    r = run_cli([EVAL, "--data", str(train), "--backend", "sim", "--no-progress"])
    assert r.returncode == 2 and "tar of tars" in r.stderr and "Traceback" not in r.stderr


def test_parquet_folder_of_several_splits_is_refused(sets, tmp_path):
    shutil.copytree(sets["parquet"][0], tmp_path / "data")
    shutil.copy(tmp_path / "data" / "validation-00000-of-00003.parquet",
                tmp_path / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(DatasetError, match="several splits.*validation-\\*.parquet"):
        build_dataset(str(tmp_path / "data"))
    assert len(build_dataset(str(tmp_path / "data" / "validation-*.parquet"))) == N


def test_not_a_container_and_missing_files(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"\x01" * 2000)
    with pytest.raises(DatasetError, match="cannot read x.tar as a tar"):
        build_dataset(str(tmp_path / "x.tar"))
    with pytest.raises(DatasetError, match="no such file"):
        build_dataset(str(tmp_path / "missing.tar"))
    with pytest.raises(DatasetError, match="matches no file"):
        build_dataset(str(tmp_path / "*.parquet"))


# -- the tar index cache ------------------------------------------------------------------------
def test_tar_index_is_built_once_and_rebuilt_when_the_tar_changes(sets, tmp_path, monkeypatch):
    from engine.pipeline.containers import tar as tarmod

    monkeypatch.setenv("IMAGENET_ENGINE_CACHE", str(tmp_path / "cache"))
    src, labels = sets["tar"]
    copy = tmp_path / "val.tar"
    shutil.copy(src, copy)
    scans = []
    real = tarmod.scan
    monkeypatch.setattr(tarmod, "scan", lambda *a, **k: scans.append(a[0]) or real(*a, **k))
    first = build_dataset(str(copy), labels)
    second = build_dataset(str(copy), labels)
    assert len(scans) == 1 and first.paths == second.paths
    assert len(os.listdir(tmp_path / "cache" / "tar-index")) == 1
    os.utime(copy, ns=(1, 1))  # "edited": another mtime
    build_dataset(str(copy), labels)
    assert len(scans) == 2


# -- the pixel cache ------------------------------------------------------------------------------
def test_pixel_cache_keys_container_images_by_shard_position_and_size(sets, tmp_path):
    from engine.config import resolve_config
    from engine.pipeline.pixelcache import HIT_OK, MISS, PixelCache, pixel_key

    cfg = resolve_config("resnext50_32x4d", {"resize": 64, "crop": 56}, backend="sim")
    shutil.copytree(sets["wds"][0], tmp_path / "wds")
    ds = build_dataset(str(tmp_path / "wds"))
    cache = PixelCache.open(str(tmp_path / "px"), ds, cfg.preprocess, None, verify=True)  # hashes via the reader
    assert (cache.state == MISS).all()
    pixels = np.zeros((N,) + cache.shape, np.uint8)
    pixels[:, 0, 0, 0] = np.arange(N)
    from engine.pipeline.ring import OK

    cache.put(0, pixels, np.full(N, OK, np.int8), {})
    cache.flush()
    assert cache.key["container"] == "wds"
    cache.close()
    again = PixelCache.open(str(tmp_path / "px"), build_dataset(str(tmp_path / "wds")), cfg.preprocess, None,
                            verify=True)
    assert (again.state == HIT_OK).all()
    again.close()
    os.utime(tmp_path / "wds" / "val-000001.tar", ns=(5, 5))  # one shard edited: its images decode again
    edited = PixelCache.open(str(tmp_path / "px"), build_dataset(str(tmp_path / "wds")), cfg.preprocess, None,
                             verify=True)
    state = edited.state.copy()
    edited.close()
    assert (state[15:30] == MISS).all() and (state[:15] == HIT_OK).all() and (state[30:] == HIT_OK).all()
    folder = build_dataset(sets["folder"][0])
    assert pixel_key(cfg.preprocess, None, folder.root) == PixelCache.open(
        str(tmp_path / "px2"), folder, cfg.preprocess, None, write=False).key  # folders: today's key


# -- run-score ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["wds", "parquet"])
def test_run_score_names_container_images(sets, tmp_path, layout):
    out = tmp_path / "out"
    r = run_cli([SCORE, "--data", sets[layout][0], "--out", str(out), "--backend", "sim", "--sim-batch-ms", "1",
                 "--batch-size", "8", "--workers", "2", "--part-size", "16", "--format", "jsonl", "--no-progress"])
    assert r.returncode == 0, r.stderr
    manifest = (out / "manifest.tsv").read_text().splitlines()
    lines = [l.split("\t") for l in manifest if not l.startswith("#")]
    ds = build_dataset(sets[layout][0])
    assert [l[2] for l in lines] == list(ds.paths)
    rows = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".jsonl"):
            rows += [json.loads(l) for l in (out / name).read_text().splitlines()]
    assert sorted((r["id"], r["path"]) for r in rows) == list(enumerate(ds.paths))
    want = "val-000001.tar:ILSVRC2012_val_00000016" if layout == "wds" else "validation-00001-of-00003.parquet:0"
    assert [r["path"] for r in rows if r["id"] == 15 + (layout == "parquet")] == [want]


# -- devkit ---------------------------------------------------------------------------------------
def _devkit(tmp_path, val_ids):
    """A devkit tar.gz whose meta.mat lists the 1,000 leaves in a shuffled (not wnid-sorted) order
    plus some non-leaf synsets, as the real one does (ids 1..1000 for the leaves)."""
    sio = pytest.importorskip("scipy.io")
    from engine.classes import imagenet_classes

    wnids = [w for w, _ in imagenet_classes()]
    order = np.random.default_rng(0).permutation(1000)
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O"),
             ("children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]
    rows = [(k + 1, wnids[j], f"w{j}", "g", 0, np.zeros(0), 0, 1300) for k, j in enumerate(order)]
    rows += [(1001 + k, f"n9999999{k}", "parent", "g", 3, np.array([1, 2, 3]), 1, 0) for k in range(3)]
    synsets = np.array(rows, dtype=dtype)
    mat = io.BytesIO()
    sio.savemat(mat, {"synsets": synsets})
    gt = "".join(f"{i}\n" for i in val_ids).encode()
    path = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in (("ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue()),
                           ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", gt)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path), order


def test_devkit_labels_match_torchvision(sets, tmp_path, monkeypatch):
    from engine.pipeline.containers.devkit import devkit_labels

    ids = [int(v) for v in np.random.default_rng(1).integers(1, 1001, size=N)]
    path, order = _devkit(tmp_path, ids)
    entries = devkit_labels(path)
    assert [n for n, _ in entries] == ["ILSVRC2012_val_%08d" % (k + 1) for k in range(N)]
    assert [l for _, l in entries] == [int(order[i - 1]) for i in ids]  # id -> meta.mat's wnid -> sorted index
    # the reference: torchvision's ImageNet dataset parses the same archive (its md5 check skipped)
    tv = pytest.importorskip("torchvision.datasets.imagenet")
    monkeypatch.setattr(tv, "_verify_archive", lambda *a: None)
    tv.parse_devkit_archive(str(tmp_path), os.path.basename(path))
    _, val_wnids = tv.load_meta_file(str(tmp_path))
    from engine.classes import wnid_to_index

    assert [l for _, l in entries] == [wnid_to_index()[w] for w in val_wnids]
    src, _ = sets["tar"]
    ds = build_dataset(src, path)  # the val tar with the devkit as --labels
    assert list(ds.labels) == [l for _, l in entries]


# -- make-dataset ---------------------------------------------------------------------------------
@pytest.mark.parametrize("container", ["tar", "wds", "parquet"])
def test_make_dataset_writes_containers(tmp_path, container):
    out = tmp_path / container
    r = run_cli([MAKE, str(out), "--images", "12", "--classes", "3", "--layout", "flat", "--seed", "2",
                 "--container", container, "--shard-size", "5"])
    assert r.returncode == 0, r.stderr
    files = tmp_path / "files"
    r = run_cli([MAKE, str(files), "--images", "12", "--classes", "3", "--layout", "flat", "--seed", "2"])
    ref = build_dataset(str(files))
    data = str(out / "ILSVRC2012_img_val.tar") if container == "tar" else str(out)
    ds = build_dataset(data, str(out / "val_label.txt") if container == "tar" else None)
    np.testing.assert_array_equal(ds.labels, ref.labels)
    assert len(set(ds.container.files)) == (1 if container == "tar" else 3)
    assert not (out / ".make-dataset-files").exists()


# -- the workers' Parquet reads, make-cache and run-bench --e2e ------------------------------------
def test_a_chunk_of_parquet_rows_reads_its_row_group_once(sets, monkeypatch):
    import pyarrow.parquet as pq

    from engine.pipeline.pool import _chunks

    ds = build_dataset(*sets["parquet"])  # row groups of 5 rows, shards of 16
    calls = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: calls.append(i) or real(self, i, *a, **k))
    reader = ByteReader()
    for i in range(16):
        reader.read(ds.locator(i))
    assert calls == [0, 1, 2, 3]  # a row group per 5 rows, never one per image
    # the pool's jobs never span two row groups (nor two shards)
    jobs = _chunks(list(range(14)), 16, ds, 12)  # dataset rows 12..25: groups 2, 3 of shard 0, then 0, 1 of shard 1
    assert [[12 + r for r in j] for j in jobs] == [[12, 13, 14], [15], [16, 17, 18, 19, 20], [21, 22, 23, 24, 25]]
    folder = build_dataset(*sets["folder"])
    assert _chunks(list(range(20)), 8, folder, 0) == [list(range(8)), list(range(8, 16)), list(range(16, 20))]


def test_make_cache_and_run_bench_take_containers(sets, tmp_path, capsys):
    cache = str(tmp_path / "px")
    args = [os.path.join(ROOT, "bin", "make-cache"), "--data", sets["wds"][0], "--pixel-cache", cache,
            "--resize", "64", "--crop", "56", "--workers", "2", "--batch-size", "8", "--no-progress"]
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    r = run_cli(args[:-1])
    assert r.returncode == 0 and f"{N} already cached, 0 to decode" in r.stderr, r.stderr
    from engine.bench import run_bench_main

    js = str(tmp_path / "e.json")
    status = run_bench_main(["--backend", "sim", "--sim-batch-ms", "1", "--batch-sizes", "8", "--iterations", "2",
                             "--e2e", sets["parquet"][0], "--limit", "20", "--workers", "2", "--json", js])
    assert status == 0
    assert json.load(open(js))["results"][0]["end_to_end_img_per_s"] > 0
    with pytest.raises(SystemExit):
        run_bench_main(["--backend", "sim", "--e2e", str(tmp_path / "missing.tar")])
    assert "no such file" in capsys.readouterr().err


def test_workers_keep_to_the_row_groups_they_read():
    """The pool's job choice for Parquet rows: a worker's own row group first, then one nobody holds,
    else the head of the queue (a worker never waits while there is work)."""
    import collections
    from types import SimpleNamespace

    from engine.pipeline.pool import WorkerPool, _Job

    pool = WorkerPool.__new__(WorkerPool)
    groups = [(0, 0), (0, 0), (0, 0), (0, 1), (0, 1), (0, 2), (0, 0)]
    pool.queue = collections.deque(_Job(k, None, [], g) for k, g in enumerate(groups))
    pool._owners, pool.size = {}, 2
    a, b = SimpleNamespace(wid=0), SimpleNamespace(wid=1)
    pool.workers = {0: a, 1: b}
    order = [(w.wid, pool._take(w).id) for w in (a, b, a, b, b, b, a)]
    assert order == [(0, 0), (1, 3), (0, 1), (1, 4), (1, 5), (1, 2), (0, 6)]
    pool.queue = collections.deque([_Job(9, None, [], None), _Job(10, None, [], (0, 0))])
    assert pool._take(b).id == 9  # files and tar members: the head, as always

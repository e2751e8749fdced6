"""The index: layouts, ImageNet class indices, fixed order, --limit, and clear errors."""

import os
import shutil

import numpy as np
import pytest

from engine.classes import imagenet_classes, wnid_to_index
from engine.pipeline.dataset import DatasetError, build_dataset, build_unlabelled, read_label_file


def _touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_class_list_is_imagenet():
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert classes[0] == ("n01440764", "tench")
    assert wnid_to_index()["n15075141"] == 999


def test_wnid_folders_get_standard_indices_even_for_a_subset(tmp_path):
    # two classes far apart in the ImageNet list: indices must not be renumbered to 0 and 1
    _touch(tmp_path / "n15075141" / "b.JPEG")
    _touch(tmp_path / "n01443537" / "a.JPEG")
    ds = build_dataset(str(tmp_path))
    assert dict(zip(ds.paths, ds.labels.tolist())) == {
        os.path.join("n01443537", "a.JPEG"): 1, os.path.join("n15075141", "b.JPEG"): 999}
    assert ds.class_names[999] == imagenet_classes()[999][1]


def test_other_folder_names_sorted_like_torchvision(tmp_path):
    for cls in ("zebra", "Apple", "mango"):
        _touch(tmp_path / cls / f"{cls}.png")
    ds = build_dataset(str(tmp_path), num_classes=3)
    from torchvision.datasets import ImageFolder

    ref = ImageFolder(str(tmp_path), loader=lambda p: p)
    assert ds.class_names == tuple(ref.classes)
    got = {os.path.join(str(tmp_path), p): int(label) for p, label in zip(ds.paths, ds.labels)}
    assert got == dict(ref.samples)


def test_extensions_case_insensitive_and_non_images_skipped(tmp_path):
    _touch(tmp_path / "n01440764" / "a.JPEG")
    _touch(tmp_path / "n01440764" / "b.jpg")
    _touch(tmp_path / "n01440764" / "notes.txt")
    assert len(build_dataset(str(tmp_path))) == 2


def test_fixed_order_by_file_name_and_limit(folder_set):
    ds = build_dataset(folder_set)
    names = [os.path.basename(p) for p in ds.paths]
    assert names == sorted(names)
    head = build_dataset(folder_set, limit=17)
    assert head.paths == ds.paths[:17]
    assert len(set(head.labels.tolist())) > 1  # the first N span classes, not one folder


def test_flat_folder_with_label_file(flat_set):
    ds = build_dataset(flat_set)  # val_label.txt found in the folder
    ds2 = build_dataset(flat_set, labels=os.path.join(flat_set, "val_label.txt"))
    assert ds.paths == ds2.paths and np.array_equal(ds.labels, ds2.labels)
    expected = dict(read_label_file(os.path.join(flat_set, "val_label.txt")))
    assert {p: int(label) for p, label in zip(ds.paths, ds.labels)} == expected


def test_label_names_without_extension(tmp_path):
    _touch(tmp_path / "imgs" / "ILSVRC2012_val_00000001.JPEG")
    _touch(tmp_path / "imgs" / "ILSVRC2012_val_00000002.JPEG")
    (tmp_path / "labels.txt").write_text("ILSVRC2012_val_00000001 65\nILSVRC2012_val_00000002 970\n")
    ds = build_dataset(str(tmp_path / "imgs"), labels=str(tmp_path / "labels.txt"))
    assert ds.labels.tolist() == [65, 970]


@pytest.mark.parametrize("setup, message", [
    ("missing", "no such folder"),
    ("empty", "empty folder"),
    ("loose", "give --labels"),
    ("label_names_missing", "not in"),
    ("unlabelled_files", "have no line in --labels"),
    ("bad_line", "expected 'FILENAME INDEX'"),
    ("bad_index", "not an integer"),
    ("out_of_range", "classes"),
    ("no_label_file", "no such file"),
])
def test_clear_errors(tmp_path, setup, message):
    data, labels = tmp_path / "data", None
    data.mkdir()
    if setup == "missing":
        shutil.rmtree(data)
    elif setup == "loose":
        _touch(data / "a.JPEG")
    elif setup in ("label_names_missing", "unlabelled_files", "bad_line", "bad_index", "out_of_range"):
        _touch(data / "a.JPEG")
        _touch(data / "b.JPEG")
        labels = tmp_path / "labels.txt"
        labels.write_text({
            "label_names_missing": "a.JPEG 1\nb.JPEG 2\nc.JPEG 3\n",
            "unlabelled_files": "a.JPEG 1\n",
            "bad_line": "a.JPEG\n",
            "bad_index": "a.JPEG one\nb.JPEG 2\n",
            "out_of_range": "a.JPEG 1000\nb.JPEG 2\n",
        }[setup])
    elif setup == "no_label_file":
        _touch(data / "a.JPEG")
        labels = tmp_path / "nope.txt"
    with pytest.raises(DatasetError, match=message):
        build_dataset(str(data), labels=str(labels) if labels else None)


def test_unlabelled_folder_and_list(tmp_path):
    _touch(tmp_path / "d" / "x" / "1.jpg")
    _touch(tmp_path / "d" / "2.png")
    ds = build_unlabelled(str(tmp_path / "d"))
    assert sorted(ds.paths) == sorted([os.path.join("x", "1.jpg"), "2.png"])
    assert (ds.labels == -1).all()

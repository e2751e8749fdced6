"""Writing a set of images as containers, in the set's order (bin/make-dataset, tests, bench).

    write_tar(items, path)                          one flat tar of the files (as ILSVRC2012_img_val.tar)
    write_wds(items, out, shard_size, prefix)       WebDataset shards PREFIX-000000.tar ...: KEY.jpg + KEY.cls
    write_parquet(items, out, shard_size, prefix)   Hugging Face `datasets` layout: PREFIX-00000-of-0000N.parquet,
                                                    `image` {bytes, path} and `label` (int64), row groups of
                                                    `row_group` rows (100: what `datasets` writes for images),
                                                    snappy, no dictionary encoding for the image bytes

`items` is [(file path, name in the container, label)] in the order to write; an image's
bytes go in unchanged, so every layout decodes to the same pixels.
"""

from __future__ import annotations

import io
import os
import tarfile
from typing import List, Optional, Sequence, Tuple

Item = Tuple[str, str, int]  # (path of the file, its name, label)


def items_of(dataset) -> List[Item]:
    """A folder Dataset's images, in its order, named by file name."""
    return [(dataset.abspath(i), os.path.basename(dataset.paths[i]), int(dataset.labels[i]))
            for i in range(len(dataset))]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def write_tar(items: Sequence[Item], path: str) -> str:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for src, name, _ in items:
            _add(tf, name, _read(src))
    return path


def _shards(items: Sequence[Item], shard_size: int) -> List[Sequence[Item]]:
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    return [items[lo:lo + shard_size] for lo in range(0, len(items), shard_size)] or [items]


def write_wds(items: Sequence[Item], out: str, shard_size: int = 1000, prefix: str = "val") -> List[str]:
    """Shards as the webdataset package's TarWriter writes them: members KEY.EXT, consecutive per sample."""
    os.makedirs(out, exist_ok=True)
    written = []
    for k, chunk in enumerate(_shards(items, shard_size)):
        path = os.path.join(out, f"{prefix}-{k:06d}.tar")
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
            for src, name, label in chunk:
                key, ext = os.path.splitext(name)
                ext = ext.lower().lstrip(".")
                _add(tf, f"{key}.{'jpg' if ext in ('jpg', 'jpeg') else ext}", _read(src))
                if label >= 0:
                    _add(tf, f"{key}.cls", str(label).encode("ascii"))
        written.append(path)
    return written


def write_parquet(items: Sequence[Item], out: str, shard_size: int = 1000, prefix: str = "validation",
                  row_group: int = 100) -> List[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("writing Parquet needs pyarrow: pip install imagenet-engine[parquet]") from None
    os.makedirs(out, exist_ok=True)
    shards = _shards(items, shard_size)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image_type), ("label", pa.int64())])
    written = []
    for k, chunk in enumerate(shards):
        path = os.path.join(out, f"{prefix}-{k:05d}-of-{len(shards):05d}.parquet")
        images = pa.array([{"bytes": _read(src), "path": name} for src, name, _ in chunk], type=image_type)
        labels = pa.array([label for _, _, label in chunk], type=pa.int64())
        # no dictionary encoding for the image bytes (every value is unique: a dictionary page only
        # costs, about twice the CPU per row to read here); the label column keeps it
        pq.write_table(pa.Table.from_arrays([images, labels], schema=schema), path, row_group_size=row_group,
                       use_dictionary=["label"])
        written.append(path)
    return written


CONTAINERS = ("tar", "wds", "parquet")


def convert(folder: str, out: str, container: str, shard_size: int = 1000, labels: Optional[str] = None) -> List[str]:
    """Write the images of a folder dataset (ImageFolder, or flat with `labels` / val_label.txt) into
    `out` as `container`, in the dataset's order. tar: one tar keeping the relative paths
    (class folders stay folders; a flat set also gets `val_label.txt` beside it)."""
    from engine.pipeline.dataset import build_dataset

    ds = build_dataset(folder, labels)
    os.makedirs(out, exist_ok=True)
    if container == "tar":
        items = [(ds.abspath(i), ds.paths[i].replace(os.sep, "/"), int(ds.labels[i])) for i in range(len(ds))]
        path = write_tar(items, os.path.join(out, "ILSVRC2012_img_val.tar"))
        if ds.layout == "flat":
            with open(os.path.join(out, "val_label.txt"), "w", encoding="utf-8") as f:
                f.writelines(f"{os.path.basename(n)} {label}\n" for _, n, label in items)
        return [path]
    if container == "wds":
        return write_wds(items_of(ds), out, shard_size)
    if container == "parquet":
        return write_parquet(items_of(ds), out, shard_size)
    raise ValueError(f"unknown container {container!r}; expected one of {', '.join(CONTAINERS)}")

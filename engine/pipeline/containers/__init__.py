"""Where an image's bytes are: one reader per storage kind behind one small interface.

`open_container(data, ...)` (the factory, like timm's `create_reader`) looks at the `--data`
string and returns the index of a container layout, or None for a plain folder or list file
(engine/pipeline/dataset.py handles those as before):

    FILE.tar                  a tar of images: flat (ILSVRC2012_img_val.tar, labels from --labels),
                              class folders inside (an ImageFolder), or WebDataset samples
                              (KEY.jpg + KEY.cls); tar.py
    A.tar::B.tar, X-{000..063}.tar, 'DIR/*.tar', DIR of *.tar
                              several tar shards, in the order given (a pattern's or a folder's
                              sorted order); tar.py
    FILE.parquet, 'DIR/*.parquet', DIR of *.parquet
                              Hugging Face `datasets` Parquet shards (`image` {bytes, path},
                              `label`); parquet.py
    s3://..., gs://...        any of the above in object storage, through fsspec; shards.py

The index is a `Container`: for image i, its container file, two integers (tar: byte offset and
length; Parquet: row group and row) and the file's size and mtime, which is what the workers'
`preprocess.containers.ByteReader` reads and what the pixel cache keys an image by. Order:
shards in the order above, members and rows in file order, so `--limit`, `--shard` and counts
agree across layouts holding the same images in the same order. Reports name an image
`SHARD:MEMBER` (`val-000003.tar:n01440764_10026`, `validation-00001.parquet:417`), SHARD
relative to the root the report gives.
"""

from __future__ import annotations

from typing import Optional

from engine.pipeline.containers.index import (NO_IMAGE, NOT_REGULAR, PARQUET, RANGE, UNOPENED,  # noqa: F401
                                              Container, bad_reason, check_labels, finish)


def is_container_spec(data: str) -> bool:
    """Whether `--data` names a container layout (the factory below handles it)."""
    from engine.pipeline.containers.shards import classify

    return classify(data) is not None


def open_container(data: str, labels: Optional[str], limit: Optional[int], num_classes: int,
                   labelled: bool = True):
    """The Dataset of a container layout, or None when `data` is a folder or a list file."""
    from engine.pipeline.containers.shards import classify, list_shards

    kind = classify(data)
    if kind is None:
        return None
    files, root = list_shards(data, kind)
    if kind == "parquet":
        from engine.pipeline.containers.parquet import parquet_dataset

        return parquet_dataset(data, files, root, labels, limit, num_classes, labelled)
    from engine.pipeline.containers.tar import tar_dataset

    return tar_dataset(data, files, root, labels, limit, num_classes, labelled)



__all__ = ["Container", "bad_reason", "check_labels", "finish", "is_container_spec", "open_container"]

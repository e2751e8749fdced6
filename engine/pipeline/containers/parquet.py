"""Parquet shards in the Hugging Face `datasets` layout, read with pyarrow.

A shard holds an `image` column (a struct {bytes: binary, path: string}, as `datasets.Image`
writes it, or plain binary) and, for evaluation, an integer `label` column (the class index;
-1, as the test split has, or null is no label). Rows are images in file order, named
`SHARD:ROW` (`validation-00001.parquet:417`, ROW counted from 0 in the file). The index is the
footer: row groups and their row counts; nothing of the image column is read to build it.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from engine.pipeline.containers.index import PARQUET, UNOPENED, Container, check_labels, finish, shard_name
from engine.pipeline.images import DatasetError, imagenet_names
from engine.pipeline.containers.shards import file_stat
from preprocess.containers import filesystem, is_url


def _err(msg: str):
    return DatasetError(msg)


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise _err("Parquet data needs pyarrow: pip install imagenet-engine[parquet]") from None
    return pq


def _open(path: str):
    pq = _pyarrow()
    if is_url(path):
        fs, p = filesystem(path)
        return pq.ParquetFile(fs.open(p, "rb"))
    return pq.ParquetFile(path)


def _check_schema(shard: str, pf) -> None:
    import pyarrow as pa

    schema = pf.schema_arrow
    if "image" not in schema.names:
        raise _err(f"{shard}: no `image` column (the Hugging Face layout: image {{bytes, path}}, label); "
                   f"its columns: {', '.join(schema.names)}")
    t = schema.field("image").type
    ok = (pa.types.is_binary(t) or pa.types.is_large_binary(t)
          or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0))
    if not ok:
        raise _err(f"{shard}: its `image` column is {t}, not the image bytes (binary, or a struct with `bytes`)")


def parquet_dataset(data: str, files: List[str], root: str, labels: Optional[str], limit: Optional[int],
                    num_classes: int, labelled: bool):
    if labels is not None:
        raise _err(f"--labels {labels}: Parquet shards carry their labels (the `label` column); leave --labels out")
    names: List[str] = []
    label_list: List[int] = []
    fids: List[int] = []
    a: List[int] = []
    b: List[int] = []
    reasons: List[str] = []
    stats: List[Tuple[int, int]] = []
    no_label_column = []
    for fid, path in enumerate(files):
        shard = shard_name(root, path)
        try:
            st = file_stat(path)
            pf = _open(path)
        except _ImportErrors as e:
            raise _err(f"--data {data}: {e}") from None
        except Exception as e:  # OSError, pyarrow.ArrowInvalid (not Parquet, a damaged footer)
            if len(files) == 1:
                raise _err(f"--data {data}: cannot open {shard} as Parquet ({e})") from None
            stats.append((-1, -1))
            names.append(shard)
            label_list.append(-1)
            fids.append(fid)
            a.append(-1)
            b.append(UNOPENED + len(reasons))
            reasons.append(f"the shard {shard} cannot be opened ({e})")
            continue
        stats.append(st)
        _check_schema(shard, pf)
        meta = pf.metadata
        row = 0
        for g in range(meta.num_row_groups):
            count = meta.row_group(g).num_rows
            names.extend(f"{shard}:{row + r}" for r in range(count))
            fids.extend([fid] * count)
            a.extend([g] * count)
            b.extend(range(count))
            row += count
        if labelled and "label" in pf.schema_arrow.names:
            col = pf.read(columns=["label"]).column(0)
            values = np.asarray(col.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
            label_list.extend(int(v) for v in values)
        else:
            if labelled:
                no_label_column.append(shard)
            label_list.extend([-1] * row)
    container = Container("parquet", PARQUET, tuple(files), tuple(stats), np.asarray(fids, np.int32),
                          np.asarray(a, np.int64), np.asarray(b, np.int64), tuple(reasons))
    class_names = imagenet_names() if num_classes == 1000 else tuple(str(i) for i in range(num_classes))
    if not labelled:
        return finish(root, names, label_list, container, class_names, "unlabelled", limit)
    if no_label_column:
        raise _err(f"--data {data}: {no_label_column[0]} has no `label` column; give labelled shards, or score "
                   "them with run-score")
    check_labels(data, names, label_list, container, num_classes, "the Parquet `label` column")
    return finish(root, names, label_list, container, class_names, "parquet", limit)


_ImportErrors = (ImportError,)

"""Per-image results: `run-eval --per-image PATH` writes one row per image; `compare-runs` reads
them back, and reads run-score's output folders the same way.

Columns (the names run-score uses where they mean the same thing, engine/scoring/writer.py):
`id` (the image's position in the run, int64), `path` (relative to `--data`), `size` (bytes,
-1 unknown), `label` (the class counted against; -1 none), `topk_index` (best first),
`topk_prob` (softmax, over the classes the run could predict), `correct_top1`, `correct_top5`,
`error` (null, or why the image failed; then the lists and flags are null).

Parquet keeps the metadata in its schema (`imagenet_engine` = JSON with `schema`,
`schema_version`, model, preprocessing, label set, ...). CSV has it as its first line,
`# {JSON}`, then the header (pandas: `read_csv(path, skiprows=1)`); lists as JSON arrays.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from engine.errors import UsageError
from engine.scoring.writer import text_field, write_durably

SCHEMA = "imagenet-engine.per-image"
SCHEMA_VERSION = 1
META_KEY = "imagenet_engine"
FORMATS = {".parquet": "parquet", ".csv": "csv"}
COLUMNS = ("id", "path", "size", "label", "topk_index", "topk_prob", "correct_top1", "correct_top5", "error")
TOPK = 5


class PerImageError(UsageError):
    """A per-image file cannot be written or read; the message says what to change."""


def format_of(path: str) -> str:
    """"parquet" or "csv" from the file name; PerImageError otherwise."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise PerImageError(f"--per-image {path}: name it .parquet or .csv (the format follows the extension)")
    if FORMATS[ext] == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise PerImageError(f"--per-image {path}: Parquet needs pyarrow: pip install imagenet-engine[parquet], "
                                "or name the file .csv") from None
    return FORMATS[ext]


class PerImageRows:
    """The rows of one run in dataset order, filled batch by batch (arrays of the data set's size)."""

    def __init__(self, paths: Sequence[str], root: str, k: int = TOPK):
        n = len(paths)
        self.paths, self.root, self.k = paths, root, k
        self.label = np.full(n, -1, np.int64)
        self.topk = np.full((n, k), -1, np.int32)
        self.prob = np.zeros((n, k), np.float32)
        self.scored = np.zeros(n, bool)
        self.errors: Dict[int, str] = {}

    def update(self, indices: np.ndarray, labels: np.ndarray, topk: np.ndarray, prob: np.ndarray) -> None:
        k = min(self.k, topk.shape[1])
        self.topk[indices, :k] = topk[:, :k]
        self.prob[indices, :k] = prob[:, :k]
        self.label[indices] = labels
        self.scored[indices] = True

    def fail(self, index: int, reason: str) -> None:
        self.errors[int(index)] = reason

    def rows(self) -> np.ndarray:
        """Dataset indices of the images the run reached (scored or failed), in order."""
        reached = self.scored.copy()
        if self.errors:
            reached[list(self.errors)] = True
        return np.nonzero(reached)[0]

    def write(self, path: str, metadata: Dict) -> int:
        """Write the file (atomically); returns the number of rows."""
        fmt = format_of(path)
        idx = self.rows()
        sizes = np.array([_size(os.path.join(self.root, self.paths[i])) for i in idx], np.int64)
        meta = dict(metadata, schema=SCHEMA, schema_version=SCHEMA_VERSION, rows=int(len(idx)))
        ok = self.scored[idx] & np.array([int(i) not in self.errors for i in idx], bool)
        label = self.label[idx]
        topk = self.topk[idx]
        c1 = ok & (topk[:, 0] == label) & (label >= 0)
        c5 = ok & (topk == label[:, None]).any(axis=1) & (label >= 0)
        paths = [text_field(self.paths[i]) for i in idx]
        errors = [text_field(self.errors.get(int(i))) for i in idx]
        if fmt == "parquet":
            data = _parquet(idx, paths, sizes, label, topk, self.prob[idx], ok, c1, c5, errors, meta)
        else:
            data = _csv(idx, paths, sizes, label, topk, self.prob[idx], ok, c1, c5, errors, meta)
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        write_durably(os.path.abspath(path), data)
        return int(len(idx))


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _parquet(idx, paths, sizes, label, topk, prob, ok, c1, c5, errors, meta):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, k = topk.shape
    # a failed image's list is null and empty (older pyarrow refuses a null list with a length)
    offsets = pa.array(np.concatenate([[0], np.cumsum(np.where(ok, k, 0))]).astype(np.int32))
    failed = pa.array(~ok)
    table = pa.table({
        "id": pa.array(idx.astype(np.int64)),
        "path": pa.array(paths, type=pa.string()),
        "size": pa.array(sizes),
        "label": pa.array(label),
        "topk_index": pa.ListArray.from_arrays(offsets, pa.array(topk[ok].reshape(-1)), mask=failed),
        "topk_prob": pa.ListArray.from_arrays(offsets, pa.array(prob[ok].reshape(-1)), mask=failed),
        "correct_top1": pa.array(c1, mask=~ok),
        "correct_top5": pa.array(c5, mask=~ok),
        "error": pa.array(errors, type=pa.string()),
    })
    table = table.replace_schema_metadata({META_KEY.encode(): json.dumps(meta, sort_keys=True).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return memoryview(sink.getvalue())


def _csv(idx, paths, sizes, label, topk, prob, ok, c1, c5, errors, meta) -> bytes:
    buf = io.StringIO()
    buf.write("# " + json.dumps(meta, sort_keys=True) + "\n")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    t, p = topk.tolist(), np.round(prob.astype(np.float64), 7).tolist()
    for j in range(len(idx)):
        good = bool(ok[j])
        w.writerow([int(idx[j]), paths[j], int(sizes[j]), int(label[j]),
                    json.dumps(t[j]) if good else "", json.dumps(p[j]) if good else "",
                    int(c1[j]) if good else "", int(c5[j]) if good else "", errors[j] or ""])
    return buf.getvalue().encode("utf-8")


# -- reading ------------------------------------------------------------------------------------
@dataclass
class Rows:
    """One run's rows as compare-runs needs them."""

    source: str  # the file or folder read
    kind: str  # "per-image" or "run-score"
    paths: List[str]
    sizes: np.ndarray  # int64, -1 unknown
    labels: np.ndarray  # int64, -1 none
    top1: np.ndarray  # int64, -1 for failed images
    top5: np.ndarray  # int64 [n, <=5], -1 padding / failed
    errors: List[Optional[str]]
    meta: Dict

    def __len__(self) -> int:
        return len(self.paths)


def read_rows(path: str) -> Rows:
    """A per-image file (.parquet/.csv) or a run-score output folder (or one of its part files)."""
    if os.path.isdir(path):
        return _read_run_score(path)
    if not os.path.exists(path):
        raise PerImageError(f"{path}: no such file or folder (give a --per-image file or a run-score --out folder)")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        cols, meta = _read_parquet(path)
    elif ext == ".csv":
        cols, meta = _read_csv(path)
    elif ext == ".jsonl":
        cols, meta = _read_jsonl(path), {}
    else:
        raise PerImageError(f"{path}: not a per-image file (.parquet, .csv) nor a run-score output (.jsonl, folder)")
    kind = "per-image" if meta.get("schema") == SCHEMA else "run-score"
    if meta.get("schema") == SCHEMA and int(meta.get("schema_version", 0)) > SCHEMA_VERSION:
        raise PerImageError(f"{path}: per-image schema version {meta['schema_version']} is newer than this engine's "
                            f"({SCHEMA_VERSION}); upgrade imagenet-engine")
    return _rows(path, kind, cols, meta, sizes=None)


def _need(path: str, cols: Dict, names: Sequence[str]) -> None:
    missing = [c for c in names if c not in cols]
    if missing:
        raise PerImageError(f"{path}: no column {', '.join(missing)}; expected a run-eval --per-image file "
                            "or run-score output")


def _rows(path: str, kind: str, cols: Dict, meta: Dict, sizes: Optional[Dict[str, int]]) -> Rows:
    _need(path, cols, ("path", "topk_index"))
    paths = [str(p) for p in cols["path"]]
    n = len(paths)
    errors = list(cols.get("error") or [None] * n)
    errors = [e if e not in ("", None) else None for e in errors]
    top5 = np.full((n, TOPK), -1, np.int64)
    for i, t in enumerate(cols["topk_index"]):
        if errors[i] is None and t is not None:
            t = list(t)[:TOPK]
            top5[i, :len(t)] = t
    labels = np.array([(-1 if v in (None, "") else int(v)) for v in cols.get("label", [None] * n)], np.int64)
    if "size" in cols:
        size_arr = np.array([(-1 if v in (None, "") else int(v)) for v in cols["size"]], np.int64)
    elif sizes is not None:
        size_arr = np.array([sizes.get(p, -1) for p in paths], np.int64)
    else:
        size_arr = np.full(n, -1, np.int64)
    return Rows(source=path, kind=kind, paths=paths, sizes=size_arr, labels=labels, top1=top5[:, 0].copy(),
                top5=top5, errors=errors, meta=meta)


def _read_parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PerImageError(f"{path}: reading Parquet needs pyarrow: pip install imagenet-engine[parquet]") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types for a file that is not Parquet
        raise PerImageError(f"{path}: not a readable Parquet file ({e})") from None
    raw = table.schema.metadata or {}
    meta: Dict = {}
    if META_KEY.encode() in raw:
        meta = json.loads(raw[META_KEY.encode()].decode())
    else:  # run-score parts: each key holds a string or a JSON value
        meta = {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"ARROW")}
    return {name: table.column(name).to_pylist() for name in table.column_names}, meta


def _read_csv(path: str):
    with open(path, encoding="utf-8", newline="") as f:
        first = f.readline()
        meta: Dict = {}
        if first.startswith("# "):
            try:
                meta = json.loads(first[2:])
            except ValueError:
                raise PerImageError(f"{path}: its first line is not the per-image metadata (# JSON)") from None
        else:
            f.seek(0)
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise PerImageError(f"{path}: empty file") from None
        cols: Dict[str, list] = {h: [] for h in header}
        for row in reader:
            for h, v in zip(header, row):
                cols[h].append(v)
    if "topk_index" in cols:
        cols["topk_index"] = [json.loads(v) if v else None for v in cols["topk_index"]]
    return cols, meta


def _read_jsonl(path: str) -> Dict:
    cols: Dict[str, list] = {}
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for key in set().union(*(r.keys() for r in rows)) if rows else ():
        cols[key] = [r.get(key) for r in rows]
    return cols


def read_part_columns(path: str, fmt: str) -> Dict[str, list]:
    """The columns of one run-score part file (parquet, csv or jsonl), by name; CSV cells as text
    (empty for null), the top-k lists parsed."""
    if fmt == "parquet":
        return _read_parquet(path)[0]
    if fmt == "csv":
        return _read_csv(path)[0]
    return _read_jsonl(path)


def _read_run_score(folder: str) -> Rows:
    from engine.scoring.writer import OutputError, read_output_folder

    try:
        run, manifest, out = read_output_folder(folder)
    except OutputError as e:
        raise PerImageError(str(e)) from None
    done = out.done_records(range(out.num_parts))
    if len(done) < out.num_parts:
        raise PerImageError(f"{folder}: {len(done)} of {out.num_parts} parts are done; finish the run "
                            "(run run-score again with the same options) before comparing it")
    cols: Dict[str, list] = {}
    for p in range(out.num_parts):
        c = read_part_columns(out.part_path(p), run["format"])
        for k, v in c.items():
            cols.setdefault(k, []).extend(v)
    sizes = dict(zip(manifest.paths, manifest.sizes.tolist()))
    meta = {k: run.get(k) for k in ("model", "weights_sha256", "backend", "precision", "preprocessing",
                                     "engine_version", "data_root", "manifest_sha256")}
    return _rows(folder, "run-score", cols, meta, sizes=sizes)

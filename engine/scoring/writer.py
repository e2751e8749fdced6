"""The output folder of a scoring run: parts, done records, `_SUCCESS`.

NOTE [Part commit protocol]
===========================

Part `p` holds the rows of manifest ids `[p * K, (p + 1) * K)`. It is committed in this order:

    encode the rows in memory (parquet / jsonl / csv)
    -> write .part-00000p.parquet.tmp-HOST-PID, fsync it          (a crash here: a stray tmp file)
    -> rename to part-00000p.parquet, fsync the folder            (a crash here: a part with no record)
    -> write part-00000p.done (JSON: rows, failed, bytes, sha256)
       the same way: tmp, fsync, rename, fsync the folder         <- the commit point
    -> the part is done

A part is done if and only if its `.done` record exists, parses, names the part and the part
file beside it has the recorded size. Anything else is redone from scratch: the new file is
renamed over the old one, so a part is either done with exactly its rows or not done at all.
Renames are atomic and both files are complete before they get their final names, so a reader
never sees half a part; readers should take only parts that have a `.done` record (or wait for
`_SUCCESS`, written once every part of the manifest is done).

Every write goes through `_write_all`; an ENOSPC/EDQUOT there or in fsync removes the tmp file
and raises `DiskFullError`, so a full disk never leaves a part recorded as done.
Several processes (shards, Ray actors, a duplicated Slurm task) may write into one folder:
temporary names carry host and pid, and committing the same part twice writes the same rows.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import queue
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

from engine import files
from engine.errors import RunError
from engine.procs import pid_alive

RUN_FILE = "run.json"
SUCCESS_FILE = "_SUCCESS"
FORMATS = ("parquet", "jsonl", "csv")
EXTENSIONS = {"parquet": ".parquet", "jsonl": ".jsonl", "csv": ".csv"}
COLUMNS = ("id", "path", "topk_index", "topk_prob", "top1_wnid", "top1_name", "error")
_FULL = (errno.ENOSPC, errno.EDQUOT)


class OutputError(RunError):
    """The output folder cannot be written; the message says why and what to do."""


class DiskFullError(OutputError):
    """No space left (ENOSPC or EDQUOT) while writing a file of the output folder."""

    hint = ("nothing half-written is recorded as done and finished parts are kept: make room (or use another "
            "--out) and run the same command again to resume")

    def __init__(self, path: str, error: OSError):
        free = ""
        try:
            st = os.statvfs(os.path.dirname(path) or ".")
            free = f", {st.f_bavail * st.f_frsize / 2**20:.1f} MiB free"
        except OSError:
            pass
        super().__init__(f"disk full ({os.strerror(error.errno or 0)}{free}) while writing {path}")
        self.path, self.error = path, error


def _write_all(fd: int, data) -> None:
    """Every byte of the output goes through here (a test replaces it to fake a full disk)."""
    files.write_all(fd, data)


def fsync_dir(path: str) -> None:
    files.fsync_dir(path)


def _tmp_name(path: str) -> str:
    d, name = os.path.split(path)
    return os.path.join(d, f".{name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _disk_full(path: str, e: BaseException) -> BaseException:
    """A full disk as DiskFullError (its one line says what to do); anything else as it is."""
    if isinstance(e, OSError) and e.errno in _FULL:
        return DiskFullError(path, e)
    return e


def _write_tmp(path: str, data) -> str:
    """Write `data` to a tmp file beside `path` and fsync it; returns the tmp name."""
    tmp = _tmp_name(path)
    try:
        files.write_tmp(tmp, data, write=lambda fd, d: _write_all(fd, d))
    except OSError as e:
        raise _disk_full(path, e) from None
    return tmp


def write_durably(path: str, data) -> None:
    """tmp, fsync, rename over `path`, fsync the folder: `path` is the old or the new content
    (engine/files.py write_replace, every byte through `_write_all`)."""
    try:
        files.write_replace(path, data, tmp=_tmp_name(path), write=lambda fd, d: _write_all(fd, d))
    except OSError as e:
        raise _disk_full(path, e) from None


def create_once(path: str, data) -> bool:
    """Create `path` with `data` unless it exists (atomically: link of a complete tmp file).

    Returns True if this call created it; False if it was already there (content untouched).
    """
    if os.path.exists(path):
        return False
    tmp = _write_tmp(path, data)
    try:
        os.link(tmp, path)
        created = True
    except FileExistsError:
        created = False
    finally:
        os.unlink(tmp)
    fsync_dir(os.path.dirname(path) or ".")
    return created


def read_output_folder(folder: str, root: Optional[str] = None):
    """(run.json as a dict, the manifest, the `OutputDir`) of a run-score output folder, for its
    readers (compare-runs, `run-score --summarize`). OutputError says what is missing or unreadable."""
    from engine.scoring.manifest import MANIFEST_FILE, ManifestError, load_manifest

    run_file = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(run_file):
        raise OutputError(f"{folder}: not a run-score output folder (no {RUN_FILE})")
    try:
        with open(run_file, encoding="utf-8") as f:
            run = json.load(f)
        manifest = load_manifest(os.path.join(folder, MANIFEST_FILE), root=root)
    except (ManifestError, OSError, ValueError) as e:
        raise OutputError(f"{folder}: cannot read its {RUN_FILE} or {MANIFEST_FILE} ({e})") from None
    return run, manifest, OutputDir(folder, manifest.num_parts(run["part_size"]), run["format"])


# -- rows ---------------------------------------------------------------------------------------
def text_field(s: Optional[str]) -> Optional[str]:
    """A path or reason as valid UTF-8: bytes that are not (a file name from os.listdir keeps them
    as surrogate escapes) become backslash escapes, like '\\xe9'."""
    if s is None or s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")



@dataclass
class PartRows:
    """The finished rows of one part: ids [lo, lo + n)."""

    part: int
    lo: int
    paths: Sequence[str]
    topk_index: np.ndarray  # int32 [n, k] (rows of failed images: anything)
    topk_prob: np.ndarray  # float32 [n, k]
    errors: List[Optional[str]]  # None, or why the image failed
    labels: Optional[np.ndarray] = None  # int64 [n], the data set's labels (-1: none); None: no label column

    @property
    def n(self) -> int:
        return len(self.paths)

    @property
    def failed(self) -> int:
        return sum(e is not None for e in self.errors)


class RowEncoder:
    """Rows to bytes in one format; `class_table` is [(wnid, name)] for an ImageNet model, else None."""

    def __init__(self, fmt: str, class_table=None, metadata: Optional[Dict] = None):
        if fmt not in FORMATS:
            raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self.metadata = metadata or {}
        self.wnids: Optional[np.ndarray] = None
        self.names: Optional[np.ndarray] = None
        if class_table is not None:
            self.wnids = np.array([w for w, _ in class_table] + [None], dtype=object)
            self.names = np.array([n for _, n in class_table] + [None], dtype=object)
        self._warm: Optional[threading.Thread] = None
        if fmt == "parquet":
            import pyarrow  # noqa: F401  (fail now if missing)

            # the first parquet write imports and initialises a lot (1-2 s, pandas among it when
            # installed): do it now, beside the pool's start, not in the first part's commit
            self._warm = threading.Thread(target=self._parquet, name="parquet-warmup", daemon=True, args=(
                PartRows(0, 0, [], np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float32), []), np.zeros(0, bool)))
            self._warm.start()

    def _top1(self, rows: PartRows, ok: np.ndarray):
        if self.wnids is None:
            none = [None] * rows.n
            return none, none
        assert self.names is not None
        top1 = np.where(ok, rows.topk_index[:, 0], len(self.wnids) - 1)
        return self.wnids[top1], self.names[top1]

    def encode(self, rows: PartRows):
        if self._warm is not None:
            self._warm.join()
            self._warm = None
        rows = PartRows(rows.part, rows.lo, [text_field(p) or "" for p in rows.paths], rows.topk_index,
                        rows.topk_prob, [text_field(e) for e in rows.errors], rows.labels)
        ok = np.fromiter((e is None for e in rows.errors), dtype=bool, count=rows.n)
        if self.fmt == "parquet":
            return self._parquet(rows, ok)
        return self._text(rows, ok)

    def _parquet(self, rows: PartRows, ok: np.ndarray):
        import pyarrow as pa
        import pyarrow.parquet as pq

        n, k = rows.topk_index.shape
        offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
        failed = pa.array(~ok)
        wnid, name = self._top1(rows, ok)
        table = pa.table({
            "id": pa.array(np.arange(rows.lo, rows.lo + n, dtype=np.int64)),
            "path": pa.array(list(rows.paths), type=pa.string()),
            "topk_index": pa.ListArray.from_arrays(offsets, pa.array(rows.topk_index.reshape(-1)), mask=failed),
            "topk_prob": pa.ListArray.from_arrays(offsets, pa.array(rows.topk_prob.reshape(-1)), mask=failed),
            "top1_wnid": pa.array(list(wnid), type=pa.string()),
            "top1_name": pa.array(list(name), type=pa.string()),
            "error": pa.array(rows.errors, type=pa.string()),
        })
        if rows.labels is not None:  # the data set's label (null where it has none)
            table = table.append_column("label", pa.array(rows.labels, type=pa.int64(), mask=rows.labels < 0))
        meta = {k: (v if isinstance(v, str) else json.dumps(v, sort_keys=True)) for k, v in self.metadata.items()}
        meta.update(part=str(rows.part), first_id=str(rows.lo), rows=str(n))
        table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return memoryview(sink.getvalue())

    def _text(self, rows: PartRows, ok: np.ndarray) -> bytes:
        wnid, name = self._top1(rows, ok)
        idx, prob = rows.topk_index.tolist(), rows.topk_prob.tolist()
        buf = io.StringIO()
        labels = None if rows.labels is None else [None if v < 0 else int(v) for v in rows.labels.tolist()]
        if self.fmt == "jsonl":
            for i in range(rows.n):
                good = bool(ok[i])
                row = {"id": rows.lo + i, "path": rows.paths[i],
                       "topk_index": idx[i] if good else None, "topk_prob": prob[i] if good else None,
                       "top1_wnid": wnid[i], "top1_name": name[i], "error": rows.errors[i]}
                if labels is not None:
                    row["label"] = labels[i]
                buf.write(json.dumps(row, ensure_ascii=False))
                buf.write("\n")
        else:  # csv: lists as JSON arrays, nulls as empty fields
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(COLUMNS + (("label",) if labels is not None else ()))
            for i in range(rows.n):
                good = bool(ok[i])
                w.writerow([rows.lo + i, rows.paths[i],
                            json.dumps(idx[i]) if good else "", json.dumps(prob[i]) if good else "",
                            wnid[i] or "", name[i] or "", rows.errors[i] or ""]
                           + ([] if labels is None else ["" if labels[i] is None else labels[i]]))
        return buf.getvalue().encode("utf-8")


# -- the folder ---------------------------------------------------------------------------------
class OutputDir:
    """Names and commit protocol of one run's output folder (NOTE [Part commit protocol])."""

    def __init__(self, path: str, num_parts: int, fmt: str):
        self.path = os.path.abspath(path)
        self.num_parts = num_parts
        self.fmt = fmt
        self.width = max(5, len(str(max(num_parts - 1, 0))))
        self._done_re = re.compile(r"part-(\d+)\.done\Z")

    def part_name(self, part: int) -> str:
        return f"part-{part:0{self.width}d}{EXTENSIONS[self.fmt]}"

    def part_path(self, part: int) -> str:
        return os.path.join(self.path, self.part_name(part))

    def done_path(self, part: int) -> str:
        return os.path.join(self.path, f"part-{part:0{self.width}d}.done")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def read_done(self, part: int) -> Optional[Dict]:
        """The part's done record if the part is done (NOTE [Part commit protocol]), else None."""
        try:
            with open(self.done_path(part), encoding="utf-8") as f:
                rec = json.load(f)
            if rec.get("part") != part or rec.get("file") != self.part_name(part):
                return None
            if os.stat(self.part_path(part)).st_size != rec.get("bytes"):
                return None
        except (OSError, ValueError, AttributeError):
            return None
        return rec

    def done_records(self, parts: Iterable[int]) -> Dict[int, Dict]:
        """{part: record} for the given parts that are done (one listing, then one stat per candidate)."""
        wanted = set(parts)
        try:
            names = os.listdir(self.path)
        except OSError:
            return {}
        out = {}
        for name in names:
            m = self._done_re.match(name)
            if m:
                p = int(m.group(1))
                if p in wanted:
                    rec = self.read_done(p)
                    if rec is not None:
                        out[p] = rec
        return out

    def remove_stale(self, parts: Iterable[int]) -> int:
        """Clear the way to redo `parts`: remove their tmp files, record-less part files and
        invalid records; also remove any tmp file left by a dead process of this host. Returns a count."""
        mine = set(parts)
        host = socket.gethostname()
        pattern = re.compile(r"\.?part-(\d+)(\.[a-z]+)(\.tmp-(.*)-(\d+))?\Z")
        removed = 0
        for name in os.listdir(self.path):
            m = pattern.match(name)
            if not m:
                continue
            part = int(m.group(1))
            if m.group(3) is not None:  # a tmp file
                if part not in mine and not (m.group(4) == host and not pid_alive(int(m.group(5)))):
                    continue
            elif part not in mine or self.read_done(part) is not None:
                continue  # not ours to redo, or a done part (its file or its record)
            try:
                os.unlink(os.path.join(self.path, name))
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def commit(self, rows: PartRows, data, extra: Optional[Dict] = None) -> Dict:
        """Write the part file, then its done record (NOTE [Part commit protocol]). Returns the record."""
        view = memoryview(data).cast("B")
        write_durably(self.part_path(rows.part), view)
        rec = {
            "part": rows.part, "file": self.part_name(rows.part), "first_id": rows.lo, "rows": rows.n,
            "failed": rows.failed, "bytes": view.nbytes, "sha256": hashlib.sha256(view).hexdigest(),
            "host": socket.gethostname(), "pid": os.getpid(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        rec.update(extra or {})
        try:
            write_durably(self.done_path(rows.part), (json.dumps(rec, sort_keys=True) + "\n").encode())
        except BaseException:
            try:  # not done: do not leave a record-less part file behind either (a resume redoes it)
                os.unlink(self.part_path(rows.part))
            except OSError:
                pass
            raise
        return rec

    def write_success(self, summary: Dict) -> bool:
        """Write `_SUCCESS` if every part of the manifest is done; returns whether it is there."""
        records = self.done_records(range(self.num_parts))
        if len(records) < self.num_parts:
            return False
        summary = dict(summary, parts=self.num_parts, images=sum(r["rows"] for r in records.values()),
                       failed=sum(r["failed"] for r in records.values()))
        write_durably(self.file(SUCCESS_FILE), (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
        return True


class PartWriter:
    """A thread that encodes and commits finished parts, so the event loop never waits on the disk.

    After a failure it keeps draining its queue (so `submit` never blocks forever), writes
    nothing more, and `close()` raises the failure; `on_error` is called once from the thread.
    """

    def __init__(self, out: OutputDir, encoder: RowEncoder, on_error: Optional[Callable[[BaseException], None]] = None,
                 max_pending: int = 4, extra: Optional[Dict] = None):
        self.out, self.encoder, self.on_error, self.extra = out, encoder, on_error, extra
        self.error: Optional[BaseException] = None
        self.records: List[Dict] = []
        self.busy_s = 0.0
        self._queue: "queue.Queue[Optional[PartRows]]" = queue.Queue(max_pending)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="part-writer", daemon=True)
        self._thread.start()

    def submit(self, rows: PartRows) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put(rows)

    def _run(self) -> None:
        while True:
            rows = self._queue.get()
            if rows is None:
                return
            if self.error is not None:
                continue
            t = time.perf_counter()
            try:
                rec = self.out.commit(rows, self.encoder.encode(rows), self.extra)
                self.records.append(rec)
            except BaseException as e:  # reported by close() and on_error, never lost
                self.error = e
                if self.on_error is not None:
                    self.on_error(e)
            finally:
                self.busy_s += time.perf_counter() - t

    def close(self) -> None:
        """Wait until every submitted part is committed; raise the first failure. Idempotent."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

"""Reading an image's bytes where it lives: a loose file, a byte range of a tar, a Parquet row.

The workers (preprocess/worker.py), autotune's decode probe and the pixel cache's --cache-verify
read through `ByteReader`; engine/pipeline/containers/ builds the index that names the images.
An image is named by a *locator*, a small picklable value that travels in a worker's job:

    "PATH"                                   a loose file (what the folder layouts give)
    ("range", FILE, offset, length, NAME)    `length` bytes at `offset` of FILE (a tar member,
                                             a WebDataset sample's image)
    ("parquet", FILE, row_group, row, NAME)  the image bytes of one row of a Parquet file
    ("failed", REASON, 0, 0, NAME)           known bad from the index (a shard that cannot be
                                             opened, a sample with no image): fails with REASON

FILE is a local path or a URL (`s3://bucket/key`, `gs://...`) read through fsspec; NAME is how
reports name the image (`val-000003.tar:n01440764_10026`). Nothing is extracted to disk and the
bytes go straight to the decoder in this process: pixels never travel through a pipe.

What a reader keeps open (per process, so per worker): local files as descriptors read with
pread (LRU, at most `max_open`); one fsspec filesystem per protocol, created in this process
(fsspec instances hold sockets and event loops that must not be shared across a fork); Parquet
files with the image column of their current row group, so a worker's chunk of rows from one
row group costs one read of that row group, never one per image.

This module imports nothing from engine/ (preprocess/ is the pure hot path).
"""

from __future__ import annotations

import collections
import os
import stat
from typing import Any, Dict, Optional, Tuple, Union

from preprocess.decode import DecodeError

RANGE, PARQUET, FAILED = "range", "parquet", "failed"
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)

Locator = Union[str, Tuple[str, str, int, int, str]]


def describe(ref: Locator) -> str:
    """How reports name the image a locator points at."""
    return ref if isinstance(ref, str) else ref[4]


def is_url(path: str) -> bool:
    return "://" in path


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a directory, not an image file"
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return f"not a regular file ({name})"
    return "not a regular file"


def read_file(path: str) -> bytes:
    """The bytes of a regular file. Raises DecodeError for anything else, OSError if unreadable.

    O_NONBLOCK: opening a FIFO must not wait for a writer; it has no effect on regular files.
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DecodeError(_kind(st.st_mode))
        chunks = []
        left = st.st_size
        while True:
            chunk = os.read(fd, max(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def filesystem(url: str, cache: Optional[Dict[str, Any]] = None):
    """(fsspec filesystem, path inside it) for a URL; one filesystem per protocol in `cache`.

    Raises DecodeError-free ImportError with the extra to install when fsspec or the protocol's
    backend is missing."""
    protocol = url.split("://", 1)[0]
    if cache is not None and protocol in cache:
        fs = cache[protocol]
        return fs, fs._strip_protocol(url)
    try:
        import fsspec
    except ImportError:
        raise ImportError(f"{url}: reading object storage needs fsspec: pip install imagenet-engine[s3]") from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol, "s3")
        raise ImportError(f"{url}: no fsspec backend for {protocol}:// ({e}); "
                          f"pip install imagenet-engine[{extra}]") from None
    if cache is not None:
        cache[protocol] = fs
    return fs, path


class ByteReader:
    """Reads locators in one process; keep one per worker (see the module docstring)."""

    def __init__(self, max_open: int = 64, row_groups: int = 2):
        self.max_open = max_open
        self.row_groups = row_groups
        self._fds: "collections.OrderedDict[str, int]" = collections.OrderedDict()
        self._fs: Dict[str, Any] = {}
        self._parquet: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
        self._groups: "collections.OrderedDict[Tuple[str, int], Any]" = collections.OrderedDict()

    def read(self, ref: Locator) -> bytes:
        """The image's bytes. DecodeError: the container says there is no image there (a short
        tar, a null Parquet cell); OSError: the file cannot be read."""
        if isinstance(ref, str):
            return read_file(ref)
        kind, path, a, b, _name = ref
        if kind == RANGE:
            return self._range(path, int(a), int(b))
        if kind == PARQUET:
            return self._row(path, int(a), int(b))
        if kind == FAILED:
            raise DecodeError(path)
        raise ValueError(f"unknown locator kind {kind!r}")

    # -- byte ranges --------------------------------------------------------------------------
    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        fd = os.open(path, _OPEN_FLAGS)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise DecodeError(f"its container {os.path.basename(path)} is {_kind(st.st_mode)}")
        self._fds[path] = fd
        while len(self._fds) > self.max_open:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def _range(self, path: str, offset: int, length: int) -> bytes:
        if is_url(path):
            fs, p = filesystem(path, self._fs)
            try:
                data = fs.cat_file(p, start=offset, end=offset + length)
            except FileNotFoundError:
                raise OSError(f"{path} not found (deleted after the index was built?)") from None
        else:
            fd = self._fd(path)
            parts = []
            got = 0
            while got < length:
                chunk = os.pread(fd, length - got, offset + got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
            data = b"".join(parts)
        if len(data) < length:
            raise DecodeError(f"truncated container: {os.path.basename(path)} ends {len(data)} bytes into this "
                              f"image's {length}")
        return data

    # -- Parquet rows ------------------------------------------------------------------------
    def _parquet_file(self, path: str):
        pf = self._parquet.get(path)
        if pf is not None:
            self._parquet.move_to_end(path)
            return pf
        import pyarrow.parquet as pq

        if is_url(path):
            fs, p = filesystem(path, self._fs)
            source = fs.open(p, "rb")
        else:
            source = path
        try:
            # memory-mapped: a row group's column chunk is read from the page cache without a copy
            # into fresh memory (about half the cost of a row group read)
            pf = pq.ParquetFile(source, memory_map=not is_url(path))
        except OSError:
            raise
        except Exception as e:  # pyarrow's ArrowInvalid for a damaged footer
            raise DecodeError(f"cannot open the Parquet file {os.path.basename(path)}: {e}") from None
        self._parquet[path] = pf
        while len(self._parquet) > self.max_open:
            self._parquet.popitem(last=False)
        return pf

    def _group(self, path: str, group: int):
        key = (path, group)
        col = self._groups.get(key)
        if col is not None:
            self._groups.move_to_end(key)
            return col
        pf = self._parquet_file(path)
        try:
            table = pf.read_row_group(group, columns=["image"], use_threads=False)  # workers are single-threaded
        except OSError:
            raise
        except Exception as e:
            raise DecodeError(f"cannot read row group {group} of {os.path.basename(path)}: {e}") from None
        col = table.column(0).combine_chunks()
        import pyarrow as pa

        if pa.types.is_struct(col.type):  # flatten: a null struct gives a null image
            col = col.flatten()[col.type.get_field_index("bytes")]
        self._groups[key] = col
        while len(self._groups) > self.row_groups:
            self._groups.popitem(last=False)
        return col

    def _row(self, path: str, group: int, row: int) -> bytes:
        col = self._group(path, group)
        value = col[row].as_py()
        if value is None:
            raise DecodeError("no image bytes in this Parquet row (null)")
        if not value:
            raise DecodeError("empty file")
        return value

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._parquet.clear()
        self._groups.clear()
        self._fs.clear()


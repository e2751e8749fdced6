"""From a `--data` string to the container files it names, in their defined order.

    FILE.tar | FILE.parquet          one file (local, or s3://, gs://, ... through fsspec)
    A.tar::B.tar                     a list, in the order given (webdataset's `::`)
    val-{000000..000063}.tar         a brace pattern (webdataset / braceexpand): the order it expands to
    'DIR/*.parquet'                  a glob: sorted
    DIR                              a folder of *.tar or *.parquet and nothing else an index can use:
                                     sorted (a folder with class folders or images stays a folder)
"""

from __future__ import annotations

import glob
import os
import re
from typing import List, Optional, Tuple

from engine.pipeline.images import DatasetError, is_image_name
from preprocess.containers import filesystem, is_url

TAR_SUFFIXES = (".tar",)
COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
PARQUET_SUFFIXES = (".parquet",)
_BRACE = re.compile(r"\{([^{}]*)\}")
_SPLIT = re.compile(r"^(.*?)-\d+(?:-of-\d+)?\.parquet$")


def _err(msg: str):
    return DatasetError(msg)


def expand_braces(pattern: str) -> List[str]:
    """`a{1..3}b` -> a1b a2b a3b (zero padding kept from the first bound), `{x,y}` -> x y."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.group(1), r.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(v).zfill(width) for v in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(",")
    out: List[str] = []
    for item in items:
        out.extend(expand_braces(head + item + tail))
    return out


def _suffix_kind(name: str) -> Optional[str]:
    low = name.lower()
    if low.endswith(COMPRESSED) or low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _sniff(path: str) -> Optional[str]:
    """tar or Parquet by content, for a local file with another name (else None: a list file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if head[:4] == b"PAR1":
        return "parquet"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head[:2] == b"\x1f\x8b" and ".tar" in path.lower():
        return "tar"
    return None


def _folder_kind(names: List[str]) -> Optional[str]:
    kinds = {_suffix_kind(n) for n in names}
    if "parquet" in kinds:
        return "parquet"
    if "tar" in kinds:
        return "tar"
    return None


def classify(data: str) -> Optional[str]:
    """"tar", "parquet", or None (a folder of images or a list file: engine/pipeline/dataset.py)."""
    if not data:
        return None
    parts = data.split("::")
    first = expand_braces(parts[0])[0]
    kind = _suffix_kind(first)
    if len(parts) > 1 or _BRACE.search(data) or any(c in data for c in "*?["):
        if kind is None:
            raise _err(f"--data {data}: a list or pattern of shards must name .tar or .parquet files")
        return kind
    if is_url(data):
        if kind is not None:
            return kind
        fs, path = _fs(data)
        try:
            names = [os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
        except FileNotFoundError:
            raise _err(f"--data {data}: no such object or prefix") from None
        except OSError as e:
            raise _err(f"--data {data}: cannot list it ({e})") from None
        found = _folder_kind(names)
        if found is None:
            raise _err(f"--data {data}: no .tar or .parquet shards there (object storage holds containers, "
                       "not a folder of images)")
        return found
    if os.path.isdir(data):
        entries = os.listdir(data)
        if any(os.path.isdir(os.path.join(data, e)) for e in entries):
            return None  # class folders: an ImageFolder
        if any(is_image_name(e) for e in entries):
            return None
        return _folder_kind(entries)
    if os.path.isfile(data):
        return kind or _sniff(data)
    if kind is not None:
        raise _err(f"--data {data}: no such file")
    return None


def _fs(url: str):
    try:
        return filesystem(url)
    except ImportError as e:
        raise _err(f"--data {url}: {e}") from None


def list_shards(data: str, kind: str) -> Tuple[List[str], str]:
    """(the container files, in order, as absolute paths or URLs; the root reports name them by)."""
    from engine.pipeline.containers.index import common_root

    suffixes = PARQUET_SUFFIXES if kind == "parquet" else TAR_SUFFIXES + COMPRESSED
    files: List[str] = []
    for part in data.split("::"):
        for item in expand_braces(part):
            if is_url(item):
                files.extend(_remote(item, suffixes))
            elif any(c in item for c in "*?["):
                found = sorted(glob.glob(item))
                if not found:
                    raise _err(f"--data {data}: {item} matches no file")
                files.extend(os.path.abspath(f) for f in found)
            elif os.path.isdir(item):
                names = sorted(n for n in os.listdir(item) if n.lower().endswith(suffixes))
                files.extend(os.path.abspath(os.path.join(item, n)) for n in names)
            else:
                files.append(os.path.abspath(item))
    if not files:
        raise _err(f"--data {data}: no {' or '.join(suffixes)} files")
    if len(files) == 1 and not is_url(files[0]) and not os.path.exists(files[0]):
        raise _err(f"--data {data}: no such file")
    if len(set(files)) != len(files):
        raise _err(f"--data {data}: names a shard twice")
    if kind == "parquet":
        _one_split(data, files)
    return files, common_root(files)


def _one_split(data: str, files: List[str]) -> None:
    """A Hugging Face `data/` folder holds train-*, validation-* and test-*: refuse to mix them."""
    splits = sorted({m.group(1) for m in (_SPLIT.match(os.path.basename(f)) for f in files) if m})
    if len(splits) > 1:
        base = data.rstrip("/")
        raise _err(f"--data {data}: holds the shards of several splits ({', '.join(splits)}); name one, "
                   f"like '{base}/{splits[-1]}-*.parquet'")


def _remote(item: str, suffixes) -> List[str]:
    fs, path = _fs(item)
    protocol = item.split("://", 1)[0]
    if any(c in item for c in "*?["):
        found = sorted(fs.glob(path))
    elif item.lower().endswith(suffixes):
        return [item]
    else:
        try:
            found = sorted(p for p in fs.ls(path, detail=False) if p.lower().endswith(suffixes))
        except FileNotFoundError:
            raise _err(f"--data {item}: no such object or prefix") from None
        except OSError as e:
            raise _err(f"--data {item}: cannot list it ({e})") from None
    return [f"{protocol}://{p}" for p in found]


def file_stat(path: str) -> Tuple[int, int]:
    """(size, mtime_ns) of a container file; OSError when it cannot be reached."""
    if not is_url(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    fs, p = filesystem(path)
    info = fs.info(p)
    size = int(info.get("size") or 0)
    stamp = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("ETag") or ""
    if hasattr(stamp, "timestamp"):
        return size, int(stamp.timestamp() * 1e9)
    try:
        return size, int(float(stamp) * 1e9)
    except (TypeError, ValueError):
        import hashlib

        return size, int.from_bytes(hashlib.blake2b(str(stamp).encode(), digest_size=7).digest(), "little")

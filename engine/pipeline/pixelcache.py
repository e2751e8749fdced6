"""The exact pixel cache: the final uint8 crops of an earlier run, read back instead of decoded.

API (what the sources, make-cache and the benches use):

    CACHE_ENV = "IMAGENET_ENGINE_CACHE"      default root: $IMAGENET_ENGINE_CACHE/pixels, else
                                             ~/.cache/imagenet-engine/pixels
    PIXEL_PATH_VERSION                       bump when the engine's pixel path changes
    default_pixel_cache_dir() -> str
    PixelCacheError(RuntimeError)            the message says what to change
    CacheFull(PixelCacheError)               not enough space, or ENOSPC while writing
    MISS, HIT_OK, HIT_FAILED = 0, 1, 2       per-image state
    PixelCache.open(root, dataset, spec, max_image_pixels, verify=False, write=True) -> PixelCache
        .dir .writable .shape (H, W, 3) .state int8[N] .note (why it opened read-only, or "")
        .reason(i) -> str                    a HIT_FAILED image's reason, exactly as it was reported
        .prefetch(lo, hi)                    madvise(WILLNEED) of rows [lo, hi)
        .rows(lo, hi) -> uint8[hi-lo, H, W, 3]   zero-copy view of the mapped file
        .check(lo, hi) -> bool[hi-lo]        True = a HIT_OK row whose checksum is wrong; such rows
                                             become MISS and count as rejected. Call once per batch
                                             (it counts the hits: rows that pass, and HIT_FAILED rows)
        .read_into(lo, hi, out) -> bool[hi-lo]   copy the HIT_OK rows into out[0:hi-lo] (staging) and
                                             check them on the copy (as check; one pass over memory)
        .put(lo, pixels, status, reasons)    write-through of rows [lo, lo+n) (status: ring OK/FAILED;
                                             reasons {row: str}); only rows that are MISS are stored;
                                             raises CacheFull on a full disk, PixelCacheError on
                                             other write errors (then not writable, the run goes on);
                                             a no-op when not writable. It pwrites (~40 MB a batch)
                                             and flushes itself every 5 s / 4096 rows (fdatasync):
                                             call put and flush from one helper thread, not the loop
        .flush()                             make everything put so far durable and visible to readers
        .refresh() -> int                    a reader re-reads the records (entries flushed since open)
        .stats() -> dict                     dir, hits, written, rejected, writable, bytes, ...
        .close()
    required_bytes(n_images, shape) -> int
    check_space(cache_dir, n_missing, shape)  raises CacheFull: one line, need X GB, have Y GB, what to do
    export_bin(cache, dataset, out_dir, fmt="uint8-hwc" | "float32-nchw", mean=None, std=None,
               progress=None) -> int         ModelZoo layout: one raw .bin per image plus an info file

NOTE [Pixel cache layout and durability]
========================================

    <root>/<H>x<W>-<decode>-<key hash>/      one folder per preprocessing + data folder
        key.json      what the key is: every input that decides the pixels (written once, renamed)
        pixels        N rows of H*W*3 bytes, dataset order, sparse (ftruncate); a batch is a slice
        records       N fixed-size records (RECORD dtype), record i describes row i
        reasons       failure reasons, UTF-8 (surrogatepass), appended; a record points into it
        complete.json completion record: counts at the last flush (tmp + fsync + rename)
        lock          flock'ed by the one writer

A record holds the image's relative-path hash, size, mtime_ns, mode, label, status, the row's
pixel checksum, an optional content hash (verify), where its reason is, and a crc32 of itself: a
torn or garbage record fails its crc and reads as missing. An entry is used only when its record
is whole and every field matches the file as it is now (and, for pixels, the checksum matches
the row when it is read: `check`).

Write order (put, flush): pixels and reasons are written with pwrite (never through the mapping:
a full disk then gives ENOSPC, not SIGBUS); flush fdatasyncs them, only then writes the records
of those rows, fdatasyncs the records, and renames a fresh completion record into place. So a
record on disk only ever points at pixels that reached the disk before it: a crash, SIGKILL or
full disk at any moment leaves rows that are either valid or missing. Readers never take the
lock; they see records (whole, crc-checked) of rows whose pixels were already written.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import threading
import time
import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from engine.errors import RunError

CACHE_ENV = "IMAGENET_ENGINE_CACHE"
PIXEL_PATH_VERSION = 1
FORMAT_VERSION = 1

MISS, HIT_OK, HIT_FAILED = 0, 1, 2

# record status on disk
_EMPTY, _REC_OK, _REC_FAILED = 0, 1, 2
_MAGIC = 0x31435049  # "IPC1" little-endian

RECORD = np.dtype([
    ("magic", "<u4"),
    ("status", "u1"),
    ("has_content", "u1"),
    ("pad0", "<u2"),
    ("mode", "<u4"),
    ("pad1", "<u4"),
    ("label", "<i8"),
    ("size", "<i8"),
    ("mtime_ns", "<i8"),
    ("path_hash", "<u8", (2,)),
    ("checksum", "<u8"),
    ("content", "<u8", (2,)),
    ("reason_off", "<u8"),
    ("reason_len", "<u4"),
    ("reason_crc", "<u4"),
    ("pad2", "<u8", (3,)),
    ("pad3", "<u4"),
    ("crc", "<u4"),
])
assert RECORD.itemsize == 128, RECORD.itemsize
_CRC_BYTES = RECORD.itemsize - 4

# checksum: sums of uint64 words per block of _BLOCK_WORDS (4 KiB), weighted by odd constants
_BLOCK_WORDS = 512


class PixelCacheError(RunError):
    """The pixel cache cannot be used as asked; the message says what to change."""


class CacheFull(PixelCacheError):
    """Not enough free space for the cache, or the disk filled up while writing it."""


def default_pixel_cache_dir() -> str:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "imagenet-engine")
    return os.path.join(base, "pixels")


# --------------------------------------------------------------------------- key


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover
        return None
    try:
        return metadata.version(name)
    except Exception:
        return None


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return h.hexdigest()


def _pair(v) -> List[int]:
    if isinstance(v, (tuple, list)):
        return [int(x) for x in v]
    return [int(v)]


_IDENTITY: Dict[str, Dict[str, object]] = {}


def decoder_identity(mode: str) -> Dict[str, object]:
    """Everything about the decoders of this process that can change a pixel (computed once per mode)."""
    if mode not in _IDENTITY:
        _IDENTITY[mode] = _decoder_identity(mode)
    return json.loads(json.dumps(_IDENTITY[mode]))


def _decoder_identity(mode: str) -> Dict[str, object]:
    import PIL
    from PIL import features

    from preprocess import decode, jpegregion

    # as scripts/setup-env.sh tells them apart; the hash of PIL's compiled core also tells an
    # AVX2 build from an SSE4 one, and any rebuild
    flavour = "simd" if _dist_version("pillow-simd") and not _dist_version("pillow") else "stock"
    try:
        from PIL import _imaging

        imaging = _file_sha256(_imaging.__file__)
    except Exception as e:  # pragma: no cover - PIL without its core does not decode at all
        imaging = f"unknown ({e})"
    try:
        turbo = features.version("libjpeg_turbo")
    except Exception:
        turbo = None
    try:
        jpeg = features.version("jpg")
    except Exception:
        jpeg = None
    region = jpegregion.load()
    ident: Dict[str, object] = {
        "pillow": PIL.__version__,
        "pillow_flavour": flavour,
        "pillow_core_sha256": imaging,
        "pillow_libjpeg": jpeg,
        "pillow_libjpeg_turbo": turbo,
        "simplejpeg": _dist_version("simplejpeg") if getattr(decode, "simplejpeg", None) is not None else None,
        "decoder": decode.decoder(mode),
        "region_decoder": None,
    }
    if region is not None:
        ident["region_decoder"] = {
            "turbo": region.turbo_version,
            "abi": getattr(jpegregion, "ABI", None),
            "sha256": _file_sha256(str(region.path)),
        }
    return ident


def pixel_key(spec, max_image_pixels: Optional[int], data_root: str) -> Dict[str, object]:
    """The key of a cache folder: what decides the pixels, and which data folder they are from."""
    return {
        "format": FORMAT_VERSION,
        "pixel_path_version": PIXEL_PATH_VERSION,
        "resize": _pair(spec.resize),
        "crop": _pair(spec.crop),
        "shape": list(_shape_of(spec)),
        "interpolation": spec.interpolation,
        "decode": spec.decode,
        "max_image_pixels": _effective_limit(max_image_pixels),
        "decoders": decoder_identity(spec.decode),
        "data": os.path.realpath(data_root),
    }


def _effective_limit(max_image_pixels: Optional[int]) -> int:
    """The decompression-bomb limit the workers apply (the flag, else Pillow's threshold), so that
    no flag and the flag at Pillow's default share a cache."""
    from preprocess.worker import pixel_limit

    return int(pixel_limit(max_image_pixels))


def _shape_of(spec) -> Tuple[int, int, int]:
    return tuple(int(x) for x in spec.shape)  # type: ignore[return-value]


def _key_hash(key: Dict[str, object]) -> str:
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- space


def required_bytes(n_images: int, shape: Tuple[int, int, int]) -> int:
    """Bytes on disk for `n_images` rows of `shape` (pixels and records)."""
    return int(n_images) * (int(np.prod(shape)) + RECORD.itemsize)


def _free_bytes(path: str) -> Optional[int]:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _space_message(cache_dir: str, need: int, free: Optional[int], n_missing: int, shape) -> str:
    has = _gb(free) if free is not None else "unknown"
    return (f"pixel cache {cache_dir}: needs {_gb(need)} for {n_missing} images ({int(np.prod(shape))} bytes "
            f"each) but the disk has {has} free: free space, give --pixel-cache a folder on a bigger "
            f"disk, or run without --pixel-cache")


def check_space(cache_dir: str, n_missing: int, shape: Tuple[int, int, int]) -> None:
    """Raise CacheFull (one line) when `n_missing` more rows do not fit on the cache's disk."""
    need = required_bytes(n_missing, shape)
    free = _free_bytes(cache_dir)
    if free is not None and need > free:
        raise CacheFull(_space_message(cache_dir, need, free, n_missing, shape))


# --------------------------------------------------------------------------- checksums


_PLANS: Dict[int, Tuple[int, int, int, np.ndarray, np.uint64, np.uint64]] = {}


def _plan(rb: int) -> Tuple[int, int, int, np.ndarray, np.uint64, np.uint64]:
    """How a row of `rb` bytes is summed: whole 64-bit words in `nb` blocks of `bw` words (bw the
    divisor of the word count nearest 512 words, 4 KiB, so that there is no tail of words), block
    k weighted by 2k+1; the last rb % 8 bytes as one more word."""
    plan = _PLANS.get(rb)
    if plan is None:
        m = rb // 8
        divisors = [d for d in range(1, m + 1) if m % d == 0] if m else [1]
        bw = min(divisors, key=lambda d: (abs(d - _BLOCK_WORDS), d))
        nb = m // bw if m else 0
        weights = np.arange(1, 2 * nb + 1, 2, dtype=np.uint64)
        plan = _PLANS[rb] = (m * 8, bw, nb, weights, np.uint64(2 * nb + 1), np.uint64(_SEED))
    return plan


_SEED = 0x9E3779B97F4A7C15


def checksums(rows: np.ndarray) -> np.ndarray:
    """uint64 checksum per row of a uint8 [n, ...] array: the 64-bit words of each row are summed
    in blocks of about 4 KiB (mod 2**64), block k weighted by 2k+1, so a change in any one word
    and blocks swapped or lost change it. About 4x faster than zlib.crc32 here, and it releases
    the GIL; measured in docs/pixel-cache.md."""
    n = rows.shape[0]
    flat = rows.reshape(n, -1)
    rb = flat.shape[1]
    if n == 0:
        return np.zeros(0, np.uint64)
    q, bw, nb, weights, tail_weight, seed = _plan(rb)
    if not flat.flags.c_contiguous or flat.ctypes.data % 8:
        flat = np.ascontiguousarray(flat)
    if nb:
        words = (flat if q == rb else np.ascontiguousarray(flat[:, :q])).view(np.uint64)  # numpy < 1.23
        out = (words.reshape(n, nb, bw).sum(axis=2, dtype=np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    else:
        out = np.zeros(n, np.uint64)
    if q != rb:
        rest = np.zeros((n, 8), np.uint8)
        rest[:, :rb - q] = flat[:, q:]
        out += rest.view(np.uint64)[:, 0] * tail_weight
    out ^= seed
    return out


def _path_hash(rel: str) -> Tuple[int, int]:
    d = hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=16).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")


def content_hash(path, reader=None) -> Tuple[int, int]:
    """blake2b-128 of a file's bytes (or of a container image's, `path` a locator read by
    `reader`, preprocess/containers.py); (0, 0) when it cannot be read."""
    h = hashlib.blake2b(digest_size=16)
    if reader is not None and not isinstance(path, str):
        from preprocess.decode import DecodeError

        try:
            h.update(reader.read(path))
        except (OSError, DecodeError):
            return 0, 0
        d = h.digest()
        return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return 0, 0
    d = h.digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")


def _stat(path: str) -> Tuple[int, int, int]:
    """(size, mtime_ns, mode) of the file the path names; of the link itself for a dangling
    symlink (its failure is then cached like any other, and a target appearing changes the mode);
    (-1, -1, 0) when there is nothing (never a hit)."""
    try:
        st = os.stat(path)
    except OSError:
        try:
            st = os.lstat(path)
        except OSError:
            return -1, -1, 0
    return st.st_size, st.st_mtime_ns, st.st_mode


def _record_crc(rec_bytes: bytes) -> int:
    return zlib.crc32(rec_bytes[:_CRC_BYTES])


# --------------------------------------------------------------------------- the cache


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(path))


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:  # pragma: no cover - pwrite returns >0 or raises
            raise OSError(errno.EIO, "short write")
        done += n


def _is_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class PixelCache:
    """One cache folder opened for one dataset. Build with `PixelCache.open`."""

    def __init__(self) -> None:  # use open()
        self.dir = ""
        self.writable = False
        self.note = ""
        self.shape: Tuple[int, int, int] = (0, 0, 3)
        self.state = np.zeros(0, np.int8)
        self.key: Dict[str, object] = {}
        self._n = 0
        self._row_bytes = 0
        self._dataset: Any = None  # the run's Dataset, set by open()
        self._verify = False
        self._pix_fd = -1
        self._rec_fd = -1
        self._why_fd = -1
        self._lock_fd = -1
        self._mm: Optional[mmap.mmap] = None
        self._all: Optional[np.ndarray] = None
        self._mapped_rows = 0
        self._present = 0
        self._records = np.zeros(0, RECORD)
        self._stat = np.zeros(0, dtype=[("size", "<i8"), ("mtime_ns", "<i8"), ("mode", "<u4")])
        self._phash = np.zeros((0, 2), np.uint64)
        self._content = np.zeros((0, 2), np.uint64)
        self._pending: Dict[int, bytes] = {}
        self._reason_cache: Dict[int, str] = {}
        self._written = 0
        self._written_failed = 0
        self._rejected = 0
        self._hits = 0
        self._last_flush = time.monotonic()
        self._count_lock = threading.Lock()  # check() may run on several threads at once

    def _count(self, hits: int = 0, rejected: int = 0) -> None:
        with self._count_lock:
            self._hits += hits
            self._rejected += rejected

    # ----------------------------------------------------------------- open

    @classmethod
    def open(cls, root: Optional[str], dataset, spec, max_image_pixels: Optional[int], verify: bool = False,
             write: bool = True) -> "PixelCache":
        """Open (creating if need be) the folder for `spec` and `dataset.root` under `root` and compute
        every image's state. `write`: take the writer lock if free (else open read-only, `note` says
        why). `verify`: compare content hashes too (reads every file once)."""
        self = cls()
        try:
            self._open(root, dataset, spec, max_image_pixels, verify, write)
        except BaseException:
            self.close()
            raise
        return self

    def _open(self, root: Optional[str], dataset, spec, max_image_pixels: Optional[int], verify: bool,
              write: bool) -> None:
        root = root or default_pixel_cache_dir()
        self.shape = _shape_of(spec)
        self._row_bytes = int(np.prod(self.shape))
        self.key = pixel_key(spec, max_image_pixels, dataset.root)
        container = getattr(dataset, "container", None)
        if container is not None:  # tar / Parquet images: keyed by container position (containers/)
            self.key["data"] = dataset.root if "://" in dataset.root else os.path.realpath(dataset.root)
            self.key["container"] = container.layout
        h, w = self.shape[:2]
        self.dir = os.path.join(os.path.abspath(root), f"{h}x{w}-{spec.decode}-{_key_hash(self.key)}")
        self._dataset = dataset
        self._verify = bool(verify)
        self._n = n = len(dataset)
        if write:
            try:
                os.makedirs(self.dir, exist_ok=True)
            except OSError as e:
                raise PixelCacheError(f"pixel cache {self.dir}: cannot create it ({e.strerror or e}); give "
                                      "--pixel-cache a folder you can write, or run without it") from None
            self._take_lock()
        key_ok = self._check_key()
        # the file identities as they are now
        join, base = os.path.join, dataset.root
        if container is not None:
            self._stat, self._phash = container.identity(dataset.paths, self._stat.dtype)
        else:
            self._stat = np.array([_stat(join(base, p)) for p in dataset.paths], dtype=self._stat.dtype)
            self._phash = np.array([_path_hash(p) for p in dataset.paths], np.uint64).reshape(n, 2)
        if verify:
            self._content = self._hash_contents()
        self._open_files()
        size = os.fstat(self._pix_fd).st_size if self._pix_fd >= 0 else 0
        self._present = min(n, size // self._row_bytes)  # rows the pixels file holds now
        self._records = self._read_records(0, n) if key_ok else np.zeros(n, RECORD)
        self.state = np.zeros(n, np.int8)
        self._rejected = 0
        self._classify(np.arange(n), count_rejected=True)
        if self.writable:
            try:
                check_space(self.dir, int((self.state == MISS).sum()), self.shape)
            except CacheFull as e:
                self.note = str(e)
                self._drop_writer()
        if self.writable:
            self._forget_lost_rows()
            self._grow(n)
        self._map()

    def _take_lock(self) -> None:
        path = os.path.join(self.dir, "lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            self.note = f"pixel cache {self.dir}: read-only (cannot open its lock file: {e.strerror or e})"
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                self.note = (f"pixel cache {self.dir}: another run is writing it; this run reads what is "
                             "there and decodes the rest without storing it")
                return
            self.note = f"pixel cache {self.dir}: read-only (cannot lock it: {e.strerror or e})"
            return
        self._lock_fd = fd
        self.writable = True

    def _drop_writer(self) -> None:
        self.writable = False
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def _check_key(self) -> bool:
        """True when key.json says this key; writes it in a new folder (or over a bad one, as writer)."""
        path = os.path.join(self.dir, "key.json")
        try:
            with open(path, encoding="utf-8") as f:
                found = json.load(f)
        except (OSError, ValueError):
            found = None
        if found == self.key:
            return True
        if found is not None and not self.writable:
            return False
        if self.writable:
            # a new folder, or one whose key file is lost or garbage: start it again
            for name in ("records", "reasons", "complete.json"):
                try:
                    os.unlink(os.path.join(self.dir, name))
                except FileNotFoundError:
                    pass
            _write_json_atomic(path, self.key)
            return False
        return False

    def _hash_contents(self) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        ds = self._dataset
        if getattr(ds, "container", None) is not None:  # one reader: it keeps the containers open
            from preprocess.containers import ByteReader

            reader = ByteReader()
            hashes = [content_hash(ds.locator(i), reader) for i in range(self._n)]
            reader.close()
            return np.array(hashes, np.uint64).reshape(self._n, 2)
        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as ex:
            hashes = list(ex.map(content_hash, (ds.abspath(i) for i in range(self._n))))
        return np.array(hashes, np.uint64).reshape(self._n, 2)

    def _open_files(self) -> None:
        flags = os.O_RDWR | os.O_CREAT if self.writable else os.O_RDONLY
        for attr, name in (("_pix_fd", "pixels"), ("_rec_fd", "records"), ("_why_fd", "reasons")):
            path = os.path.join(self.dir, name)
            try:
                fd = os.open(path, flags, 0o644) if self.writable else os.open(path, flags)
            except FileNotFoundError:
                fd = -1
            except OSError as e:
                raise PixelCacheError(f"pixel cache {self.dir}: cannot open {name} ({e.strerror or e}); "
                                      "fix its permissions or give --pixel-cache another folder") from None
            setattr(self, attr, fd)

    def _forget_lost_rows(self) -> None:
        """Writer, before it grows a truncated pixels file back: clear the records of the rows the
        file lost, so no record ever points at the zeros of the regrown part."""
        lost = np.nonzero(self._records["status"][self._present:] != _EMPTY)[0] + self._present
        if len(lost) == 0:
            return
        zero = bytes(RECORD.itemsize)
        for i in lost:
            _pwrite_all(self._rec_fd, zero, int(i) * RECORD.itemsize)
        os.fdatasync(self._rec_fd)
        self._records[lost] = np.zeros(len(lost), RECORD)

    def _grow(self, n: int) -> None:
        """Writer: the pixels file covers n rows (sparse), the records file n records (allocated)."""
        want_pix = n * self._row_bytes
        if os.fstat(self._pix_fd).st_size < want_pix:
            os.ftruncate(self._pix_fd, want_pix)
        want_rec = n * RECORD.itemsize
        if os.fstat(self._rec_fd).st_size < want_rec:
            os.ftruncate(self._rec_fd, want_rec)
            try:
                os.posix_fallocate(self._rec_fd, 0, want_rec)
            except (OSError, AttributeError):
                pass

    def _map(self) -> None:
        if self._pix_fd < 0 or self._n == 0:
            return
        size = os.fstat(self._pix_fd).st_size
        rows = min(self._n, size // self._row_bytes)
        if rows <= 0:
            return
        self._mm = mmap.mmap(self._pix_fd, rows * self._row_bytes, mmap.MAP_SHARED, mmap.PROT_READ)
        self._all = np.frombuffer(self._mm, np.uint8).reshape((rows,) + self.shape)
        self._mapped_rows = rows

    def _read_records(self, lo: int, hi: int) -> np.ndarray:
        out = np.zeros(hi - lo, RECORD)
        if self._rec_fd < 0 or hi <= lo:
            return out
        data = os.pread(self._rec_fd, (hi - lo) * RECORD.itemsize, lo * RECORD.itemsize)
        got = len(data) // RECORD.itemsize
        if got:
            out[:got] = np.frombuffer(data[:got * RECORD.itemsize], RECORD)
        return out

    def _classify(self, idx: np.ndarray, count_rejected: bool) -> None:
        """Set state[idx] from the records and the files as they are now."""
        if len(idx) == 0:
            return
        rec = self._records[idx]
        raw = rec.tobytes()
        size = RECORD.itemsize
        crc_ok = np.fromiter((zlib.crc32(raw[k * size:k * size + _CRC_BYTES]) for k in range(len(idx))),
                             np.uint32, count=len(idx)) == rec["crc"]
        present = rec["magic"] == _MAGIC
        nonzero = np.frombuffer(raw, np.uint8).reshape(len(idx), size).any(axis=1)
        whole = crc_ok & present & np.isin(rec["status"], (_REC_OK, _REC_FAILED))
        st = self._stat[idx]
        same = (whole
                & (rec["path_hash"] == self._phash[idx]).all(axis=1)
                & (rec["size"] == st["size"]) & (rec["mtime_ns"] == st["mtime_ns"]) & (rec["mode"] == st["mode"])
                & (rec["label"] == np.asarray(self._dataset.labels, np.int64)[idx])
                & (st["size"] >= 0))
        if self._verify:
            same &= (rec["has_content"] == 1) & (rec["content"] == self._content[idx]).all(axis=1)
        ok = same & (rec["status"] == _REC_OK) & (idx < self._present)
        failed = same & (rec["status"] == _REC_FAILED)
        for k in np.nonzero(failed)[0]:
            if self._load_reason(int(idx[k]), rec[k]) is None:
                failed[k] = False
        state = np.full(len(idx), MISS, np.int8)
        state[ok] = HIT_OK
        state[failed] = HIT_FAILED
        self.state[idx] = state
        if count_rejected:
            self._count(rejected=int((nonzero & (state == MISS)).sum()))

    def _load_reason(self, i: int, rec) -> Optional[str]:
        if self._why_fd < 0:
            return None
        length = int(rec["reason_len"])
        data = os.pread(self._why_fd, length, int(rec["reason_off"]))
        if len(data) != length or zlib.crc32(data) != int(rec["reason_crc"]):
            return None
        try:
            text = data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return None
        self._reason_cache[i] = text
        return text

    # ----------------------------------------------------------------- read

    def reason(self, i: int) -> str:
        """The stored failure reason of a HIT_FAILED image, exactly as the decoder reported it."""
        if self.state[i] != HIT_FAILED or i not in self._reason_cache:
            raise PixelCacheError(f"pixel cache: image {i} has no stored failure (state {int(self.state[i])})")
        return self._reason_cache[i]

    def prefetch(self, lo: int, hi: int) -> None:
        """Ask the kernel to read rows [lo, hi) ahead (madvise WILLNEED)."""
        hi = min(hi, self._mapped_rows)
        if self._mm is None or hi <= lo:
            return
        page = mmap.PAGESIZE
        start = lo * self._row_bytes // page * page
        end = hi * self._row_bytes
        try:
            self._mm.madvise(mmap.MADV_WILLNEED, start, end - start)
        except (AttributeError, OSError, ValueError):
            try:
                os.posix_fadvise(self._pix_fd, start, end - start, os.POSIX_FADV_WILLNEED)
            except (AttributeError, OSError):
                pass

    def mapping(self) -> Optional[Tuple[str, int, int]]:
        """(pixels file, address of its mapping in this process, mapped bytes), or None when nothing
        is mapped: a device process (engine/pipeline/devices.py) maps the same file and reads a
        batch from `rows()` at the same offset, so cached pixels never travel through a pipe."""
        if self._all is None:
            return None
        return (os.path.join(self.dir, "pixels"), int(self._all.__array_interface__["data"][0]),
                int(self._mapped_rows * self._row_bytes))

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Zero-copy uint8 [hi-lo, H, W, 3] view of rows [lo, hi) of the mapped pixels file. Only
        HIT_OK rows (after `check`) hold valid pixels; valid until `close()`."""
        if self._all is None or hi > self._mapped_rows:
            raise PixelCacheError(f"pixel cache {self.dir}: rows [{lo}, {hi}) are not mapped "
                                  f"({self._mapped_rows} rows are)")
        return self._all[lo:hi]

    def check(self, lo: int, hi: int) -> np.ndarray:
        """Verify the checksums of the HIT_OK rows in [lo, hi). Returns bool [hi-lo], True where a row
        is bad; those rows become MISS (decode them) and count as rejected. Call it once per batch:
        it counts the batch's hits (HIT_OK rows that pass, and HIT_FAILED rows, whose reason is
        read with `reason`)."""
        bad = np.zeros(hi - lo, bool)
        self._count(hits=int((self.state[lo:hi] == HIT_FAILED).sum()))
        self._still_there(lo, hi, bad)
        sel = np.nonzero(self.state[lo:hi] == HIT_OK)[0]
        if len(sel) == 0 or self._all is None:
            return bad
        if len(sel) == hi - lo:
            sums = checksums(self._all[lo:hi])
        else:
            sums = checksums(self._all[lo + sel])
        wrong = sums != self._records["checksum"][lo + sel]
        bad[sel[wrong]] = True
        if wrong.any():
            self.state[lo + sel[wrong]] = MISS
        self._count(hits=len(sel) - int(wrong.sum()), rejected=int(wrong.sum()))
        return bad

    def _still_there(self, lo: int, hi: int, bad: np.ndarray) -> None:
        """Rows the pixels file lost since open (cut short behind our back) become bad misses
        instead of a SIGBUS when touched: one fstat per batch."""
        if self._pix_fd < 0 or self._all is None:
            return
        try:
            rows = os.fstat(self._pix_fd).st_size // self._row_bytes
        except OSError:
            return
        if rows >= hi:
            return
        gone = np.nonzero(self.state[max(lo, rows):hi] == HIT_OK)[0] + max(lo, rows)
        if len(gone):
            self.state[gone] = MISS
            bad[gone - lo] = True
            self._count(rejected=len(gone))

    def read_into(self, lo: int, hi: int, out: np.ndarray, chunk: int = 4) -> np.ndarray:
        """Copy the HIT_OK rows of [lo, hi) into `out` (uint8 [>= hi-lo, H, W, 3], e.g. pinned
        staging memory) and verify the checksums on the copy, a few rows at a time while they are
        still in the CPU cache: one pass over the mapped bytes instead of two, and what is checked
        is exactly what the caller sends on. Returns bool [hi-lo], True = bad (as `check`); rows
        that are not HIT_OK are left alone (decode them into `out`)."""
        bad = np.zeros(hi - lo, bool)
        self._still_there(lo, hi, bad)
        state = self.state[lo:hi]
        self._count(hits=int((state == HIT_FAILED).sum()))
        sel = np.nonzero(state == HIT_OK)[0]
        if len(sel) == 0 or self._all is None:
            return bad
        src, want = self._all, self._records["checksum"]
        runs = np.split(sel, np.nonzero(np.diff(sel) != 1)[0] + 1)
        wrong_rows: List[int] = []
        for run in runs:
            a0, b0 = int(run[0]), int(run[-1]) + 1
            for a in range(a0, b0, chunk):
                b = min(b0, a + chunk)
                dst = out[a:b]
                np.copyto(dst, src[lo + a:lo + b])
                sums = checksums(dst)
                wrong = np.nonzero(sums != want[lo + a:lo + b])[0]
                if len(wrong):
                    wrong_rows.extend(int(a + k) for k in wrong)
        if wrong_rows:
            w = np.array(wrong_rows)
            bad[w] = True
            self.state[lo + w] = MISS
        self._count(hits=len(sel) - len(wrong_rows), rejected=len(wrong_rows))
        return bad

    def refresh(self) -> int:
        """Re-read the records of the rows that are MISS (a reader picking up what the writer has
        flushed since). Returns how many became hits."""
        miss = np.nonzero(self.state == MISS)[0]
        if len(miss) == 0 or self._rec_fd < 0:
            return 0
        if self._pix_fd >= 0 and not self.writable:
            size = os.fstat(self._pix_fd).st_size
            if min(self._n, size // self._row_bytes) > self._mapped_rows:
                self._unmap()
                self._map()
            self._present = self._mapped_rows
        self._records[miss] = self._read_records(0, self._n)[miss]
        self._classify(miss, count_rejected=False)
        return int((self.state[miss] != MISS).sum())

    # ----------------------------------------------------------------- write

    def put(self, lo: int, pixels: np.ndarray, status: np.ndarray, reasons: Optional[Dict[int, str]] = None) -> None:
        """Store dataset rows [lo, lo+n), n = len(status): the pixels of rows whose status is the
        ring's OK, the reason of rows whose status is FAILED (reasons {row: str}). Pixels are
        written now; their records at the next flush (automatic every few seconds). Raises
        CacheFull when the disk is full; the cache is then read-only and stays resumable."""
        if not self.writable:
            return
        from engine.pipeline.ring import FAILED, OK

        status = np.asarray(status)
        n = len(status)
        if lo < 0 or lo + n > self._n:
            raise PixelCacheError(f"pixel cache: put of rows [{lo}, {lo + n}) outside the dataset (0..{self._n})")
        reasons = reasons or {}
        todo = self.state[lo:lo + n] == MISS
        ok = np.nonzero(todo & (status == OK))[0]
        failed = np.nonzero(todo & (status == FAILED))[0]
        try:
            if len(ok):
                sums = checksums(pixels[ok] if len(ok) < n else pixels[:n])
                # contiguous runs of OK rows in one pwrite each
                runs = np.split(ok, np.nonzero(np.diff(ok) != 1)[0] + 1)
                for run in runs:
                    a, b = int(run[0]), int(run[-1]) + 1
                    block = np.ascontiguousarray(pixels[a:b])
                    _pwrite_all(self._pix_fd, block, (lo + a) * self._row_bytes)
                for k, row in enumerate(ok):
                    self._pending[lo + int(row)] = self._record(lo + int(row), _REC_OK, int(sums[k]))
            for row in failed:
                text = reasons.get(int(row), "")
                data = text.encode("utf-8", "surrogatepass")
                off = os.lseek(self._why_fd, 0, os.SEEK_END)
                _pwrite_all(self._why_fd, data, off)
                self._pending[lo + int(row)] = self._record(lo + int(row), _REC_FAILED, 0, off, data)
                self._reason_cache[lo + int(row)] = text
        except OSError as e:
            self._write_failed(e, sync_pending=True)
        self._written += len(ok)
        self._written_failed += len(failed)
        if len(self._pending) >= 4096 or time.monotonic() - self._last_flush > 5.0:
            self.flush()

    def _record(self, i: int, status: int, checksum: int, reason_off: int = 0, reason: bytes = b"") -> bytes:
        r = np.zeros(1, RECORD)
        r["magic"] = _MAGIC
        r["status"] = status
        r["label"] = int(self._dataset.labels[i])
        st = self._stat[i]
        r["size"], r["mtime_ns"], r["mode"] = st["size"], st["mtime_ns"], st["mode"]
        r["path_hash"] = self._phash[i]
        r["checksum"] = checksum
        if self._verify:
            r["has_content"] = 1
            r["content"] = self._content[i]
        r["reason_off"] = reason_off
        r["reason_len"] = len(reason)
        r["reason_crc"] = zlib.crc32(reason)
        raw = bytearray(r.tobytes())
        raw[_CRC_BYTES:] = zlib.crc32(bytes(raw[:_CRC_BYTES])).to_bytes(4, "little")
        return bytes(raw)

    def _write_failed(self, e: OSError, sync_pending: bool) -> None:
        """A write failed (ENOSPC, EIO, ...): keep what is durable, stop writing, stay resumable, and
        raise CacheFull (disk full) or PixelCacheError (any other error). `sync_pending`: the rows
        put before are whole in the page cache, so their records may follow one more fdatasync;
        False after a failed fdatasync, whose rows are dropped (a second fdatasync can report
        success for data the first one lost)."""
        pending, self._pending = self._pending, {}
        if sync_pending:
            try:
                os.fdatasync(self._pix_fd)
                os.fdatasync(self._why_fd)
                self._write_records(pending)
            except OSError:
                pass  # those rows stay missing: their records never reach the disk
        self._drop_writer()
        if _is_full(e):
            raise CacheFull(f"pixel cache {self.dir}: the disk is full ({e.strerror or e}); stopped writing the "
                            "cache, the run goes on decoding; free space and run again to complete it") from None
        raise PixelCacheError(f"pixel cache {self.dir}: cannot write it ({e.strerror or e}); stopped writing "
                              "the cache, the run goes on decoding; check the disk, or run without "
                              "--pixel-cache") from None

    def _write_records(self, pending: Dict[int, bytes]) -> None:
        if not pending:
            return
        idx = sorted(pending)
        runs: List[List[int]] = [[idx[0]]]
        for i in idx[1:]:
            if i == runs[-1][-1] + 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            _pwrite_all(self._rec_fd, b"".join(pending[i] for i in run), run[0] * RECORD.itemsize)
        os.fdatasync(self._rec_fd)
        for i in idx:
            self._records[i] = np.frombuffer(pending[i], RECORD)[0]
        ok = [i for i in idx if self._records["status"][i] == _REC_OK]
        failed = [i for i in idx if self._records["status"][i] == _REC_FAILED]
        self.state[ok] = HIT_OK
        self.state[failed] = HIT_FAILED

    def flush(self) -> None:
        """Pixels and reasons to disk (fdatasync), then their records (fdatasync), then the
        completion record (tmp + fsync + rename). After it, readers that open see these rows."""
        self._last_flush = time.monotonic()
        if not self.writable:
            return
        pending, self._pending = self._pending, {}
        try:
            os.fdatasync(self._pix_fd)
            os.fdatasync(self._why_fd)
        except OSError as e:
            self._write_failed(e, sync_pending=False)
        try:
            self._write_records(pending)
            _write_json_atomic(os.path.join(self.dir, "complete.json"), self._completion())
        except OSError as e:
            self._write_failed(e, sync_pending=False)

    def _completion(self) -> Dict[str, object]:
        return {
            "format": FORMAT_VERSION,
            "rows": int(self._mapped_rows),
            "dataset_images": int(self._n),
            "ok": int((self.state == HIT_OK).sum()),
            "failed": int((self.state == HIT_FAILED).sum()),
            "missing": int((self.state == MISS).sum()),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    # ----------------------------------------------------------------- report

    def stats(self) -> Dict[str, object]:
        """Counts for the report: hits (rows checked good and read), written (stored this run),
        rejected (entries found but not used), and the folder and its size."""
        try:
            disk = os.fstat(self._pix_fd).st_blocks * 512 if self._pix_fd >= 0 else 0
        except OSError:
            disk = 0
        return {
            "dir": self.dir,
            "hits": int(self._hits),
            "hits_failed": int((self.state == HIT_FAILED).sum()),
            "written": int(self._written),
            "written_failed": int(self._written_failed),
            "rejected": int(self._rejected),
            "writable": bool(self.writable),
            "bytes": int(disk),
            "images": int(self._n),
            "valid": int((self.state != MISS).sum()),
            "verify": bool(self._verify),
            "note": self.note,
        }

    # ----------------------------------------------------------------- close

    def _unmap(self) -> None:
        self._all = None
        mm, self._mm = self._mm, None
        self._mapped_rows = 0
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # a batch view is still alive; the mapping goes with it

    def close(self) -> None:
        """Flush (writer), unmap, close the files and release the lock. Safe to call twice."""
        try:
            if self.writable and self._pending:
                self.flush()
        finally:
            self._unmap()
            for attr in ("_pix_fd", "_rec_fd", "_why_fd"):
                fd = getattr(self, attr)
                if fd >= 0:
                    os.close(fd)
                    setattr(self, attr, -1)
            self._drop_writer()

    def __enter__(self) -> "PixelCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- export


def export_bin(cache: PixelCache, dataset, out_dir: str, fmt: str = "uint8-hwc", mean=None, std=None,
               progress: Optional[Callable[[int], None]] = None) -> int:
    """Write the ModelZoo layout: one raw `.bin` per cached image, named by the image's stem
    (uint8 HWC, or float32 NCHW normalised as (x/255 - mean)/std), plus `info` files. Returns the
    number of .bin files written; images that failed or are not in the cache are not exported."""
    if fmt not in ("uint8-hwc", "float32-nchw"):
        raise PixelCacheError(f"--export-bin format {fmt!r} is not one of uint8-hwc, float32-nchw")
    if fmt == "float32-nchw":
        if mean is None or std is None:
            raise PixelCacheError("float32-nchw export needs --mean and --std")
        m = np.asarray(mean, np.float32).reshape(3, 1, 1)
        s = np.asarray(std, np.float32).reshape(3, 1, 1)
    os.makedirs(out_dir, exist_ok=True)
    h, w = cache.shape[:2]
    used: Dict[str, int] = {}
    info_lines: List[str] = []
    image_lines: List[str] = []
    written = 0
    step = 256
    for lo in range(0, len(dataset), step):
        hi = min(len(dataset), lo + step)
        cache.check(lo, hi)
        for i in range(lo, hi):
            if cache.state[i] != HIT_OK:
                if progress is not None:
                    progress(1)
                continue
            stem = os.path.splitext(os.path.basename(dataset.paths[i]))[0]
            name = stem if stem not in used else f"{stem}_{i}"
            used[name] = i
            path = os.path.join(out_dir, name + ".bin")
            px = cache.rows(i, i + 1)[0]
            if fmt == "uint8-hwc":
                data = px
            else:
                x = px.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
                data = np.ascontiguousarray((x - m) / s, np.float32)
            with open(path, "wb") as f:
                f.write(np.ascontiguousarray(data).tobytes())
            info_lines.append(f"{written} {path} {w} {h}")
            image_lines.append(f"{i}\t{dataset.paths[i]}\t{int(dataset.labels[i])}\t{name}.bin")
            written += 1
            if progress is not None:
                progress(1)
    shape = f"3x{h}x{w} float32" if fmt == "float32-nchw" else f"{h}x{w}x3 uint8"
    with open(os.path.join(out_dir, "prep_bin.info"), "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in info_lines))
    with open(os.path.join(out_dir, "images.tsv"), "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(f"# dataset index, image path relative to {dataset.root}, label, .bin file ({shape})\n")
        f.write("".join(line + "\n" for line in image_lines))
    return written

"""Region decoding of JPEGs (``_jpegregion.c``, libjpeg-turbo through ctypes).

A centre crop of a resized image needs only the pixels its resize reads: for a 500x375 file and
Resize(256) + CenterCrop(224), a window of about 336x336. Exact mode has it decoded into an
image-sized buffer (:meth:`RegionDecoder.decode_placed`) and resizes as before; fast mode has it
decoded, resized and written in one call (:meth:`RegionDecoder.fast_crop`). This
library decodes that window alone (``jpeg_crop_scanline`` for the columns, ``jpeg_skip_scanlines``
for the rows), skipping the inverse DCT, upsampling and colour conversion of the rest, at a
reduced DCT scale where fast mode picks one, and can resize the crop's box of it with Pillow's
filters and weights straight into the caller's RGB buffer. Its pixels inside the window are those
of a full decode by the same library (``tests/test_jpegregion.py``).

It is a small C file compiled against the system's libjpeg-turbo: ``scripts/setup-env.sh``
(``make setup``) builds it, and so does::

    python -m preprocess.native --build     # then: --check prints what is loaded

Where it is not built (no C compiler or no libjpeg-turbo headers), both modes decode whole images
through ``simplejpeg``, else Pillow: slower; exact mode's pixels the same, fast mode's the same up
to rounding. The library's file name carries a hash of the C source, so a build from an older
source is never loaded.
``IMAGENET_ENGINE_REGION_DECODE=0`` turns it off (for comparisons).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np

__all__ = ["ABI", "RegionDecoder", "build", "library_path", "load", "status", "window_bytes"]

ABI = 5  # IE_ABI in _jpegregion.c
DISABLE_ENV = "IMAGENET_ENGINE_REGION_DECODE"
SOURCE = Path(__file__).with_name("_jpegregion.c")

# return codes of ie_decode / ie_header / ie_fast_crop
OK, UNSUPPORTED, JPEG_ERROR, BAD_ARGS, NEED_WORK = 0, 1, 2, 3, 4
FASTDCT, FASTUPSAMPLE = 1, 2
DECODE_ONLY = 16  # fast_crop: decode the window, resize nothing (bench/bench_decode.py's ceiling)
# J_COLOR_SPACE values of jpeglib.h, for ie_header's info[2]
COLOR_SPACES = {0: "unknown", 1: "Gray", 2: "RGB", 3: "YCbCr", 4: "CMYK", 5: "YCCK"}
ALIGN = 32  # the widest iMCU: columns libjpeg-turbo may add left of the window asked for
ALIGN_ROWS = 64  # two of the tallest iMCU rows: rows it may add above and below
MIN_CROP = 32  # IE_MIN_CROP: the narrowest window decoded


class RegionError(Exception):
    """libjpeg's error or warning on a file (``str(err)`` is its message): Pillow then decides."""


def library_path(source: Optional[Path] = None) -> Path:
    """Where the build of ``source`` (default :data:`SOURCE`) lives: next to it, named by the
    source's hash and the platform."""
    source = SOURCE if source is None else source
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    return source.with_name(f"_jpegregion-{digest}-{sys.platform}-{platform.machine()}.so")


def build(cc: Optional[str] = None, quiet: bool = False) -> Path:
    """Compile ``_jpegregion.c`` into :func:`library_path`; returns it. Raises RuntimeError with the
    compiler's message when it cannot be built (no compiler, no ``jpeglib.h``, not libjpeg-turbo).

    ``cc``: the compiler command (default ``$CC``, else ``cc``). The library is written to a
    temporary name and renamed, so a process loading it meanwhile sees all of it or nothing.
    """
    target = library_path()
    cc_cmd = (cc or os.environ.get("CC") or "cc").split()
    if shutil.which(cc_cmd[0]) is None:
        raise RuntimeError(f"no C compiler ({cc_cmd[0]!r} not found): install gcc, or set CC")
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=str(target.parent))
    os.close(fd)
    # -ffp-contract=off: no fused multiply-adds in the filter-weight arithmetic (GCC fuses by default
    # on aarch64), so every platform rounds the weights as x86-64 and Pillow-SIMD do (make check-aarch64)
    cmd = cc_cmd + ["-O3", "-ffp-contract=off", "-shared", "-fPIC", "-o", tmp, str(SOURCE), "-ljpeg", "-lm"]
    try:
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if res.returncode != 0:
            first = next((line for line in res.stdout.splitlines() if "error" in line), res.stdout.strip()[:300])
            hint = " (install the libjpeg-turbo headers: libjpeg62-turbo-dev or libjpeg-turbo8-dev)" \
                if "jpeglib.h" in res.stdout or "JCS_EXTENSIONS" in res.stdout else ""
            raise RuntimeError(f"{' '.join(cmd)} failed: {first}{hint}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if not quiet:
        print(f"built {target}")
    return target


def _open_library(path: Path) -> ctypes.CDLL:
    """dlopen the library; where that fails on an undefined libjpeg symbol, in a link-map namespace
    of its own (dlmopen), so it gets the system's libjpeg-turbo and not another libjpeg.so.62 that
    the process loaded first: torchvision 0.15's wheel bundles an older libjpeg under that name,
    and once `torchvision.io` is imported a plain dlopen binds to it (no `jpeg_skip_scanlines`)."""
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        if "undefined symbol" not in str(exc):
            raise
        first = exc
    libc = ctypes.CDLL(None)
    dlmopen = getattr(libc, "dlmopen", None)
    if dlmopen is None:  # not glibc
        raise first
    dlmopen.restype = ctypes.c_void_p
    dlmopen.argtypes = [ctypes.c_long, ctypes.c_char_p, ctypes.c_int]
    handle = dlmopen(-1, str(path).encode(), os.RTLD_NOW)  # -1: LM_ID_NEWLM, a new namespace
    if not handle:
        libc.dlerror.restype = ctypes.c_char_p
        raise OSError(f"{first}; in a namespace of its own: {(libc.dlerror() or b'').decode(errors='replace')}")
    return ctypes.CDLL(str(path), handle=handle)


class RegionDecoder:
    """The loaded library. Thread-safe: each call has its own libjpeg state."""

    def __init__(self, path: Path) -> None:
        lib = _open_library(path)
        lib.ie_abi.restype = ctypes.c_int
        abi = lib.ie_abi()
        if abi != ABI:
            raise OSError(f"{path} has ABI {abi}, expected {ABI}: rebuild it (python -m preprocess.native --build)")
        lib.ie_turbo_version.restype = ctypes.c_int
        p_int = ctypes.POINTER(ctypes.c_int)
        lib.ie_header.argtypes = [ctypes.c_char_p, ctypes.c_ulong, p_int, ctypes.c_char_p, ctypes.c_int]
        lib.ie_header.restype = ctypes.c_int
        lib.ie_decode.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_void_p, ctypes.c_ulong, p_int, ctypes.c_char_p, ctypes.c_int]
        lib.ie_decode.restype = ctypes.c_int
        lib.ie_decode_placed.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int,
                                         ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                         ctypes.c_void_p, ctypes.c_ulong, ctypes.c_long, p_int, ctypes.c_char_p,
                                         ctypes.c_int]
        lib.ie_decode_placed.restype = ctypes.c_int
        lib.ie_fast_crop.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                                     ctypes.c_longlong, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                                     ctypes.c_ulong, p_int, ctypes.c_char_p, ctypes.c_int]
        lib.ie_fast_crop.restype = ctypes.c_int
        self._lib = lib
        self.path = path
        version = lib.ie_turbo_version()
        self.turbo_version = (f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}"
                              if version else "unknown")

    def header(self, data: bytes) -> Optional[Tuple[int, int, str]]:
        """``(width, height, colour space)`` of a JPEG, colour space as simplejpeg names it; None
        when libjpeg cannot read the header (Pillow then gives the reason)."""
        info = (ctypes.c_int * 5)()
        msg = ctypes.create_string_buffer(200)
        if self._lib.ie_header(data, len(data), info, msg, len(msg)) != OK:
            return None
        return info[0], info[1], COLOR_SPACES.get(info[2], "unknown")

    def decode(self, data: bytes, denom: int, flags: int, window: Tuple[int, int, int, int],
               out: np.ndarray) -> Tuple[int, int, int, int, int, int]:
        """Decode at least ``window = (x0, y0, w, h)`` of the image scaled by ``1/denom`` as RGBX
        into ``out`` (a contiguous uint8 buffer of :func:`window_bytes` bytes).

        Returns ``(x, width, y, rows, scaled_w, scaled_h)``: the window written, widened to
        libjpeg-turbo's units and to at least 32 pixels (``x <= x0``, ``x + width >= x0 + w``;
        ``y <= y0``, ``y + rows >= y0 + h``), rows ``width * 4`` bytes apart; and the scaled
        image's size. Raises RegionError (libjpeg's message) for a file it refuses or warns about,
        ValueError for a colour space it does not convert (CMYK, YCCK) and for a window that does
        not fit.
        """
        got = (ctypes.c_int * 6)()
        msg = ctypes.create_string_buffer(200)
        x0, y0, w, h = window
        _check(self._lib.ie_decode(data, len(data), denom, flags, x0, y0, w, h, out.ctypes.data, out.nbytes,
                                   got, msg, len(msg)), msg)
        return got[0], got[1], got[4], got[5], got[2], got[3]

    def decode_placed(self, data: bytes, window: Tuple[int, int, int, int], image: np.ndarray,
                      stride: int) -> Tuple[int, int, int, int, int, int]:
        """Decode at least ``window`` (full scale) as :meth:`decode` does, but write its pixels where
        they are in the image: ``image`` is a contiguous uint8 buffer of at least ``stride *
        height`` bytes holding the whole image as RGBX, rows ``stride`` bytes apart; pixels outside
        the window keep whatever they held. Returns as :meth:`decode`. Raises as :meth:`decode`.
        """
        got = (ctypes.c_int * 6)()
        msg = ctypes.create_string_buffer(200)
        x0, y0, w, h = window
        _check(self._lib.ie_decode_placed(data, len(data), 1, 0, x0, y0, w, h, image.ctypes.data, image.nbytes,
                                          stride, got, msg, len(msg)), msg)
        return got[0], got[1], got[4], got[5], got[2], got[3]

    def fast_crop(self, data: bytes, out: np.ndarray, resize, resample: int, flags: int, max_pixels: int,
                  max_resized: int, work: np.ndarray, more: Optional[Callable[[int], np.ndarray]] = None) -> None:
        """Fast mode's whole preprocessing of a JPEG in one call: the header read once, the geometry
        of ``Resize(resize)`` (an int: the shorter side; an ``(h, w)`` pair: exactly) and
        ``CenterCrop(out.shape[:2])`` as :mod:`preprocess.geometry` computes it, the DCT scale and
        window as :class:`preprocess.cropplan.CropPlan` has them, the crop's box resized with
        Pillow's filter ``resample`` (not NEAREST), RGB written into ``out`` (a ``(h, w, 3)`` uint8 array with
        packed pixels), zeros where the crop is larger than the image. Limits: pixels of the
        image (none where <= 0) and of the resized image (none where < 0).

        ``work``: a contiguous uint8 scratch buffer; where the window needs more, ``more(nbytes)``
        gives a bigger one and the call is made again (without ``more``: ValueError). Raises
        RegionError for libjpeg's refusals and warnings, ValueError for what Python's path must
        take instead (a colour space, a size or a limit: it gives the reason).
        """
        info = (ctypes.c_int * 3)()
        msg = ctypes.create_string_buffer(200)
        if isinstance(resize, int):
            short, rw, rh = resize, 0, 0
        else:
            short, rw, rh = 0, resize[1], resize[0]
        for _ in range(2):
            rc = self._lib.ie_fast_crop(data, len(data), short, rw, rh, out.shape[1], out.shape[0], resample, flags,
                                        max_pixels, max_resized, out.ctypes.data, out.strides[0], work.ctypes.data,
                                        work.nbytes, info, msg, len(msg))
            if rc != NEED_WORK or more is None:
                break
            work = more(info[2])
        _check(BAD_ARGS if rc == NEED_WORK else rc, msg)


def _check(rc: int, msg) -> None:
    """Raise for a return code of the library: RegionError for libjpeg's refusals, ValueError else."""
    if rc == OK:
        return
    text = msg.value.decode("utf-8", "replace")
    if rc == JPEG_ERROR:
        raise RegionError(text)
    raise ValueError(text)


def window_bytes(w: int, h: int) -> int:
    """The buffer :meth:`RegionDecoder.decode` needs for a window ``w x h`` (ie_window_bytes)."""
    return (max(w, MIN_CROP) + ALIGN) * (h + ALIGN_ROWS) * 4


_LOADED: Optional[RegionDecoder] = None
_WHY_NOT: Optional[str] = None
_TRIED = False


def load() -> Optional[RegionDecoder]:
    """The region decoder, or None (see :func:`status` for why). Loaded once per process."""
    global _LOADED, _WHY_NOT, _TRIED
    if _TRIED:
        return _LOADED
    _TRIED = True
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "off", "no", "false"):
        _WHY_NOT = f"turned off by {DISABLE_ENV}"
        return None
    try:
        path = library_path()
    except OSError as exc:
        _WHY_NOT = f"its source {SOURCE} cannot be read ({exc})"
        return None
    if not path.exists():
        _WHY_NOT = "not built (python -m preprocess.native --build, or make setup)"
        return None
    try:
        _LOADED = RegionDecoder(path)
    except (OSError, AttributeError) as exc:
        _WHY_NOT = f"{path.name} does not load ({exc})"
    return _LOADED


def status() -> str:
    """One line: which libjpeg-turbo the region decoder uses, or why there is none."""
    dec = load()
    if dec is not None:
        return f"region decoder on libjpeg-turbo {dec.turbo_version} ({dec.path.name})"
    return f"no region decoder: {_WHY_NOT}"


def _reset() -> None:
    """Forget what :func:`load` found (tests, and after a build in this process)."""
    global _LOADED, _WHY_NOT, _TRIED
    _LOADED, _WHY_NOT, _TRIED = None, None, False

"""Decode strategies: each tries one decoder on one image and writes into the buffer it is given.

A mode (exact, fast) is an ordered tuple of strategies, built once by :func:`build` from the
decoders this process has (the region decoder, simplejpeg, Pillow); :mod:`preprocess.decode` runs
them in order until one says :data:`DONE`. A strategy that leaves an image returns an
:class:`Outcome` that says why ("not a JPEG", "CMYK", "libjpeg-turbo refused it: ..."), and the
next one tries; the last is always Pillow, which decodes the image or raises
:class:`~preprocess.pillowio.DecodeError` with the reason. Any strategy may raise DecodeError
itself where the image must fail whoever decodes it (a resize over the pixel limit), as Pillow
would. ``decoder(mode)``, the line run-eval reports and the pixel cache keys on, is the join of
the strategies' ``summary`` fields, so it names what decodes.

::

    exact:  RegionWindowExact -> SimplejpegExact -> PillowExact     (each only where available)
    fast:   RegionFast | SimplejpegFast          -> PillowFast

Exact mode's strategies all give Pillow's pixels (libjpeg-turbo with Pillow's settings, then
Pillow's resize of the whole image); fast mode's are described in :mod:`preprocess.decode`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from preprocess import jpegregion
from preprocess.cropplan import CropPlan, dct_scale, write_exact_crop, write_resized_crop
from preprocess.geometry import resized_size
from preprocess.pillowio import Resampling, check_resized, decode_error, image_limit, load_rgb, open_image, \
    resize_limit
from preprocess.scratch import scratch, scratch_all

__all__ = ["DONE", "JpegHeader", "Outcome", "Request", "Strategy", "build", "exact_jpeg_image"]

JPEG_MAGIC = b"\xff\xd8\xff"
# Header colour spaces that libjpeg-turbo converts to RGB exactly as Pillow does (fast mode), and
# those exact mode gives it (Pillow's pixels bit for bit at full scale: YCbCr and RGB).
FAST_SPACES = ("YCbCr", "Gray", "RGB")
EXACT_SPACES = ("YCbCr", "RGB")


class Outcome(NamedTuple):
    """What a strategy did with an image: ``done`` (``out`` is written), or why it left it."""

    done: bool
    reason: str


DONE = Outcome(True, "done")
NOT_JPEG = Outcome(False, "not a JPEG")
NO_HEADER = Outcome(False, "libjpeg-turbo cannot read the header")
NEAREST = Outcome(False, "the nearest filter (another Pillow code path)")
WRONG_SIZE = Outcome(False, "libjpeg-turbo gave another size than asked for")


class JpegHeader(NamedTuple):
    """A JPEG's size and colour space (as simplejpeg names it), from either libjpeg-turbo reader:
    the region decoder's header is ``(w, h, space)`` and simplejpeg's ``(h, w, space, sub)``."""

    width: int
    height: int
    space: str


def region_header(region, data: bytes) -> Optional[JpegHeader]:
    got = region.header(data)
    return None if got is None else JpegHeader(got[0], got[1], got[2])


def simplejpeg_header(sj, data: bytes) -> Optional[JpegHeader]:
    try:
        height, width, space, _ = sj.decode_jpeg_header(data)
    except Exception:  # noqa: BLE001 -- a bad header: Pillow gives the reason
        return None
    return JpegHeader(width, height, space)


def _leaves(header: JpegHeader, spaces: Sequence[str], max_pixels: Optional[int]) -> Optional[Outcome]:
    """Why a libjpeg-turbo path leaves this JPEG to Pillow (a colour space it converts otherwise, no
    real size, over the pixel limit: Pillow's checks then give the reason), or None: it takes it."""
    if header.space not in spaces:
        return Outcome(False, f"colour space {header.space}")
    if header.width < 1 or header.height < 1:
        return Outcome(False, "an empty image")
    limit = image_limit(max_pixels)
    if limit and header.width * header.height > limit:
        return Outcome(False, "over the pixel limit")
    return None


class Request:
    """One image to preprocess: the bytes, the buffer, and what to do (checked by the caller)."""

    __slots__ = ("data", "out", "resize", "resample", "max_pixels", "fastdct", "fastupsample", "is_jpeg")

    def __init__(self, data: bytes, out: np.ndarray, resize, resample: int, max_pixels: Optional[int],
                 fastdct: bool = False, fastupsample: bool = False) -> None:
        self.data, self.out, self.resize, self.resample = data, out, resize, resample
        self.max_pixels, self.fastdct, self.fastupsample = max_pixels, fastdct, fastupsample
        self.is_jpeg = data[:3] == JPEG_MAGIC

    @property
    def crop(self) -> Tuple[int, int]:
        return self.out.shape[0], self.out.shape[1]

    def bytes(self) -> bytes:
        """The data as ``bytes`` (ctypes and simplejpeg take nothing else)."""
        return self.data if isinstance(self.data, bytes) else bytes(self.data)

    def flags(self) -> int:
        """libjpeg-turbo's fast options as the region decoder's flags (read at call time: a test
        swaps the values)."""
        return (jpegregion.FASTDCT if self.fastdct else 0) | (jpegregion.FASTUPSAMPLE if self.fastupsample else 0)


class Strategy:
    """One decoder tried on one image. ``name``: short, for traces and tests; ``summary``: its part
    of ``decoder(mode)`` (empty: not named there, see :func:`build`)."""

    name = "base"
    summary = ""

    def run(self, req: Request) -> Outcome:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


# --------------------------------------------------------------------------- exact mode


def exact_jpeg_image(sj, data: bytes, max_pixels: Optional[int]) -> Optional[Image.Image]:
    """Pillow's decode of a YCbCr/RGB JPEG, done by libjpeg-turbo through simplejpeg (at full scale
    with the accurate integer IDCT and fancy upsampling: Pillow's own settings, so Pillow's pixels
    bit for bit); None where Pillow must decode it (another colour space, a file simplejpeg refuses
    or warns about, an image over the pixel limit), so failures and their reasons stay Pillow's."""
    header = simplejpeg_header(sj, data)
    if header is None or _leaves(header, EXACT_SPACES, max_pixels) is not None:
        return None
    try:
        pixels = sj.decode_jpeg(data, "RGB", fastdct=False, fastupsample=False, strict=True)
    except Exception:  # noqa: BLE001 -- Pillow decodes it or gives the reason
        return None
    if pixels.shape != (header.height, header.width, 3):
        return None
    return Image.frombuffer("RGB", (header.width, header.height), pixels, "raw", "RGB", 0, 1)


def _finish_exact(img: Image.Image, req: Request) -> Outcome:
    """Exact mode after any decoder: the full-image resize and the centre crop, into ``req.out``."""
    width, height = img.size
    size = resized_size(width, height, req.resize)
    if size != (width, height):  # torchvision returns the image untouched then
        check_resized(size, req.max_pixels)
    write_exact_crop(img, req.out, CropPlan((width, height), size, 1, req.crop, req.resample))
    return DONE


class RegionWindowExact(Strategy):
    """The region decoder writes the window that the centre crop of the full-image resize reads
    into an image-sized RGBX buffer, at its place; the rest of the buffer is stale. Pillow's resize
    of the whole image then computes every output pixel as before, and those inside the crop read
    window pixels only (the window holds the filter's reach plus the plan's margin), which are the
    full decode's bit for bit; the others are cropped away. Same pixels as a full decode, without
    the inverse DCT, upsampling and colour conversion of the rest (tests/test_jpegregion.py)."""

    name = "region-window"

    def __init__(self, region) -> None:
        self.region = region
        self.summary = (f"YCbCr/RGB JPEGs: the window the crop reads by libjpeg-turbo {region.turbo_version} "
                        f"(region decoder), Pillow's settings and resize")

    def run(self, req: Request) -> Outcome:
        if not req.is_jpeg:
            return NOT_JPEG
        if req.resample == Resampling.NEAREST:
            return NEAREST  # Pillow's nearest resize is another code path: not worth a second analysis
        data = req.bytes()
        header = region_header(self.region, data)
        if header is None:
            return NO_HEADER
        why = _leaves(header, EXACT_SPACES, req.max_pixels)
        if why is not None:
            return why
        width, height = header.width, header.height
        size = resized_size(width, height, req.resize)
        if size != (width, height):
            check_resized(size, req.max_pixels)
        plan = CropPlan((width, height), size, 1, req.crop, req.resample)
        if plan.window[2] < 1 or plan.window[3] < 1:
            return Outcome(False, "an empty window")
        buf = scratch(width * height * 4)
        try:
            got = self.region.decode_placed(data, plan.window, buf, width * 4)
        except (jpegregion.RegionError, ValueError) as exc:
            return Outcome(False, f"libjpeg-turbo refused it: {exc}")  # simplejpeg or Pillow decides
        if got[4:] != (width, height):
            return WRONG_SIZE
        img = Image.frombuffer("RGBX", (width, height), buf, "raw", "RGBX", 0, 1)
        write_exact_crop(img, req.out, plan)
        return DONE


class SimplejpegExact(Strategy):
    """The whole YCbCr/RGB JPEG by libjpeg-turbo through simplejpeg (:func:`exact_jpeg_image`)."""

    name = "simplejpeg"

    def __init__(self, sj, named: bool = True) -> None:
        self.sj = sj
        self.summary = "YCbCr/RGB JPEGs by libjpeg-turbo via simplejpeg with Pillow's settings" if named else ""

    def run(self, req: Request) -> Outcome:
        if not req.is_jpeg:
            return NOT_JPEG
        img = exact_jpeg_image(self.sj, req.data, req.max_pixels)
        if img is None:
            return Outcome(False, "simplejpeg leaves it to Pillow")
        return _finish_exact(img, req)


class PillowExact(Strategy):
    """``Image.open(f).convert("RGB")``, torchvision's loader: every file, or its failure."""

    name = "pillow"

    def __init__(self, alone: bool) -> None:
        self.summary = "Pillow" if alone else "Pillow for the rest"

    def run(self, req: Request) -> Outcome:
        return _finish_exact(load_rgb(open_image(req.data, req.max_pixels)), req)


# --------------------------------------------------------------------------- fast mode


def _fast_plan(header: JpegHeader, req: Request) -> Tuple[Optional[Outcome], Optional[CropPlan]]:
    """Fast mode's plan for a JPEG a libjpeg-turbo path decodes, or why it leaves it."""
    why = _leaves(header, FAST_SPACES, req.max_pixels)
    if why is not None:
        return why, None
    full = (header.width, header.height)
    size = resized_size(full[0], full[1], req.resize)
    check_resized(size, req.max_pixels)
    # 1/2, 1/4, 1/8 only (the others are slower than a full decode), and only while the scaled
    # image is still at least the resize target: the same choice as Pillow's draft()
    return None, CropPlan(full, size, dct_scale(full[0], full[1], size), req.crop, req.resample)


class RegionFast(Strategy):
    """The region decoder (:mod:`preprocess.jpegregion`): only the window of the (DCT-scaled) image
    that the crop's resize reads. Where it can, in one call that also does the geometry (the same
    as :class:`~preprocess.cropplan.CropPlan`), the resize in C and the write into ``out``; for the
    nearest filter or an ``out`` whose pixels are not packed, the window is decoded and Pillow
    resizes the crop's box in it. Anything libjpeg-turbo refuses or warns about, and what Python
    must decide (a colour space, a limit), goes to Pillow, which decodes it or fails it with exact
    mode's reason."""

    name = "region"

    def __init__(self, region) -> None:
        self.region = region
        self.summary = (f"JPEG windows by libjpeg-turbo {region.turbo_version} (region decoder) with the resize "
                        f"in C")

    def run(self, req: Request) -> Outcome:
        if not req.is_jpeg:
            return NOT_JPEG
        data, out = req.bytes(), req.out
        if req.resample != Resampling.NEAREST and out.strides[1:] == (3, 1):
            # all of it in one call: header, geometry, window decode, resize, RGB into `out`
            limit, resized = image_limit(req.max_pixels) or 0, resize_limit(req.max_pixels)
            try:
                self.region.fast_crop(data, out, req.resize, req.resample, req.flags(), limit,
                                      -1 if resized is None else resized, scratch_all(), scratch)
            except (jpegregion.RegionError, ValueError) as exc:
                return Outcome(False, f"the region decoder left it: {exc}")  # Pillow decides
            return DONE
        header = region_header(self.region, data)
        if header is None:
            return NO_HEADER
        why, plan = _fast_plan(header, req)
        if plan is None:
            return why  # type: ignore[return-value]
        x0, y0, w, h = plan.window
        buf = scratch(jpegregion.window_bytes(w, h))
        try:
            x, width, y, rows, got_w, got_h = self.region.decode(data, plan.scale, req.flags(), plan.window, buf)
        except (jpegregion.RegionError, ValueError) as exc:
            return Outcome(False, f"libjpeg-turbo refused it: {exc}")
        if (got_w, got_h) != plan.scaled:
            return WRONG_SIZE  # another libjpeg-turbo?: Pillow does it
        img = Image.frombuffer("RGBX", (width, rows), buf[: width * rows * 4], "raw", "RGBX", 0, 1)
        write_resized_crop(img, out, plan, origin=(x, y))
        return DONE


class SimplejpegFast(Strategy):
    """The whole JPEG at the plan's DCT scale through simplejpeg into a reused RGBX buffer, then
    Pillow resizes the crop's box (where the region decoder is not built)."""

    name = "simplejpeg"

    def __init__(self, sj, note: str) -> None:
        self.sj = sj
        self.summary = f"whole JPEGs by libjpeg-turbo via simplejpeg ({note})"

    def run(self, req: Request) -> Outcome:
        if not req.is_jpeg:
            return NOT_JPEG
        data = req.bytes()
        header = simplejpeg_header(self.sj, data)
        if header is None:
            return NO_HEADER
        why, plan = _fast_plan(header, req)
        if plan is None:
            return why  # type: ignore[return-value]
        scale, (scaled_w, scaled_h) = plan.scale, plan.scaled
        # min_factor=s with those minimums leaves simplejpeg exactly one choice (it otherwise also
        # picks 3/8, 5/8, ... scales)
        kw = dict(min_factor=scale, min_width=scaled_w, min_height=scaled_h) if scale > 1 else {}
        try:
            pixels = self.sj.decode_jpeg(data, "RGBX", fastdct=req.fastdct, fastupsample=req.fastupsample,
                                         buffer=scratch(scaled_w * scaled_h * 4), **kw)
        except Exception as exc:  # noqa: BLE001 -- Pillow decodes it or gives exact mode's reason
            return Outcome(False, f"simplejpeg refused it: {exc}")
        if pixels.shape[:2] != (scaled_h, scaled_w):
            return WRONG_SIZE
        img = Image.frombuffer("RGBX", (scaled_w, scaled_h), pixels, "raw", "RGBX", 0, 1)
        write_resized_crop(img, req.out, plan)
        return DONE


class PillowFast(Strategy):
    """Pillow, with ``draft`` for JPEGs (its reduced DCT scale), then the resize of the crop's box."""

    name = "pillow"

    def __init__(self, note: Optional[str]) -> None:
        self.summary = "Pillow for the rest" if note is None else f"Pillow with draft() ({note})"

    def run(self, req: Request) -> Outcome:
        img = open_image(req.data, req.max_pixels)
        width, height = img.size
        size = resized_size(width, height, req.resize)
        check_resized(size, req.max_pixels)
        scale = 1
        if img.format == "JPEG":
            # Pillow picks the largest of 8, 4, 2, 1 with (W // s, H // s) >= size: the scaled
            # image still covers the resize target. It returns the original extent in the
            # scaled image's coordinates, (W / s, H / s): a partial last DCT block is kept apart.
            try:
                got = img.draft(None, size)
            except Exception as exc:  # noqa: BLE001 -- parsing untrusted bytes, see decode_error
                raise decode_error(exc, img.format) from exc
            if got is not None and got[1][2] > 0:
                scale = round(width / got[1][2])
        img = load_rgb(img)
        write_resized_crop(img, req.out, CropPlan((width, height), size, scale, req.crop, req.resample))
        return DONE


# --------------------------------------------------------------------------- the lists


def build(mode: str, region, sj, exact_turbo: bool, region_status: Callable[[], str]) -> Tuple[Strategy, ...]:
    """The ordered strategies of ``mode`` for these decoders (``region``: the loaded region decoder
    or None; ``sj``: the simplejpeg module or None; ``exact_turbo``: exact mode may use
    libjpeg-turbo; ``region_status``: jpegregion.status, for why there is no region decoder).

    The summaries join into today's ``decoder(mode)`` lines, which the pixel cache's key holds
    (a new text would orphan every cache): so in exact mode simplejpeg behind the region decoder
    is not named (it only takes the windows that one leaves, with the same pixels).
    """
    if mode == "fast":
        chain: list = []
        why = "" if region is not None else region_status().replace("no region decoder: ", "")
        if region is not None:
            chain.append(RegionFast(region))
        elif sj is not None:
            chain.append(SimplejpegFast(sj, f"region decoder {why}"))
        chain.append(PillowFast(None if chain else f"no simplejpeg; region decoder {why}"))
        return tuple(chain)
    if mode == "exact":
        chain = []
        if exact_turbo and sj is not None:
            if region is not None:
                chain.append(RegionWindowExact(region))
            chain.append(SimplejpegExact(sj, named=region is None))
        chain.append(PillowExact(alone=not chain))
        return tuple(chain)
    raise ValueError(f"unknown decode mode {mode!r}")

"""A cheap look at a JPEG's headers, and where `--decode device` sends the image.

`sniff(data)` walks the marker segments up to the first scan (a few hundred bytes for a camera
JPEG, no entropy decoding) and returns what a GPU decoder needs to know: the frame kind
(baseline, extended, progressive, other), the size, the component count, the Adobe colour
transform and whether the stream ends with an EOI marker. `route(...)` turns that into one of the
ROUTE_* codes a worker writes into the ring (engine/pipeline/ring.py): DEVICE (the bytes go to the
GPU) or one of the HOST_* reasons (the worker decodes the image in exact mode itself).

Pure functions on bytes: no torch, no Pillow (the workers import this).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

# ring.route codes: where an image of a device-decode batch was decoded, and why
ROUTE_NONE = 0  # not written (the image failed before it was read)
ROUTE_DEVICE = 1  # compressed bytes in the arena; the GPU decodes them
HOST_SHARE = 2  # a JPEG the GPU would take, decoded by the host to share the load (--host-decode-share)
HOST_KIND = 3  # progressive, lossless or arithmetic-coded: a frame kind the GPU decoder is not given
HOST_COLOUR = 4  # grayscale, CMYK/YCCK, RGB-coded or not 8-bit: colour the GPU decoder converts differently
HOST_NOT_JPEG = 5  # not a JPEG (PNG named .JPEG, other formats, damaged headers)
HOST_TRUNCATED = 6  # no EOI marker at the end: possibly truncated, so Pillow decides (fails or decodes)
HOST_TOO_BIG = 7  # over the pixel limit, or larger than the slot's byte arena has room for
HOST_FALLBACK = 8  # the GPU decoder failed on it; the backend decoded the bytes in exact mode on the host

ROUTE_NAMES = {
    ROUTE_DEVICE: "device", HOST_SHARE: "host: load share", HOST_KIND: "host: progressive/other frame kind",
    HOST_COLOUR: "host: grayscale/CMYK/YCCK/RGB-coded/12-bit", HOST_NOT_JPEG: "host: not a JPEG",
    HOST_TRUNCATED: "host: no EOI marker (truncated?)", HOST_TOO_BIG: "host: too large for the device path",
    HOST_FALLBACK: "host: the device decoder failed on it",
}

# frame kinds, as a bit mask (the ring's control word carries the kinds the device decoder takes)
KIND_BITS = {"baseline": 1, "extended": 2, "progressive": 4}

_SOF = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}  # Huffman-coded, 8 or 12 bit
_OTHER_SOF = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # lossless, hierarchical, arithmetic
_NO_LENGTH = {0x01, 0xD8} | set(range(0xD0, 0xD8))


class JpegHead(NamedTuple):
    kind: str  # baseline, extended, progressive, other
    width: int
    height: int
    components: int
    precision: int
    adobe_transform: Optional[int]  # the APP14 "Adobe" segment's transform flag, None without one
    has_eoi: bool


def sniff(data: bytes) -> Optional[JpegHead]:
    """The frame header of a JPEG, or None when `data` is not one (or its headers are damaged)."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos = 2
    adobe = None
    frame = None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None  # garbage between segments: let the host's decoder judge
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return None
        marker = data[pos]
        pos += 1
        if marker in _NO_LENGTH:
            continue
        if pos + 2 > n:
            return None
        length = (data[pos] << 8) | data[pos + 1]
        if length < 2 or pos + length > n:
            return None
        seg = pos + 2
        if marker == 0xEE and length >= 14 and data[seg:seg + 5] == b"Adobe":
            adobe = data[seg + 11]
        elif marker in _SOF or marker in _OTHER_SOF:
            if length < 8:
                return None
            frame = (_SOF.get(marker, "other"), data[seg], (data[seg + 1] << 8) | data[seg + 2],
                     (data[seg + 3] << 8) | data[seg + 4], data[seg + 5])
        elif marker == 0xDA:  # start of scan: the headers are over
            break
        pos += length
    if frame is None:
        return None
    kind, precision, height, width, components = frame
    tail = data[-64:].rstrip(b"\x00\r\n ")
    return JpegHead(kind, width, height, components, precision, adobe, tail.endswith(b"\xff\xd9"))


def host_share_pick(index: int, share: float) -> bool:
    """Whether dataset image `index` is one of the `share` the host decodes (a fixed, evenly spread
    choice: the golden-ratio sequence, so any run of images gets close to `share` of them)."""
    if share <= 0.0:
        return False
    if share >= 1.0:
        return True
    return ((index * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) / 18446744073709551616.0 < share


def route(data: bytes, kinds: int, max_pixels: int, share: float = 0.0, index: int = 0) -> int:
    """Where an image goes: ROUTE_DEVICE, or the HOST_* reason the host decodes it.

    `kinds`: KIND_BITS of the frame kinds the device decoder takes; `max_pixels`: the largest
    image the device path takes (the decompression-bomb limit, so an image over it fails on the
    host exactly as in exact mode); `share`: the part of the device's JPEGs the host decodes.
    """
    head = sniff(data)
    if head is None:
        return HOST_NOT_JPEG
    if not kinds & KIND_BITS.get(head.kind, 0):
        return HOST_KIND
    if head.components != 3 or head.precision != 8 or head.adobe_transform == 0:
        return HOST_COLOUR  # Adobe transform 0 with 3 components: the samples are RGB, not YCbCr
    if head.width < 1 or head.height < 1 or head.width * head.height > max_pixels:
        return HOST_TOO_BIG
    if not head.has_eoi:
        return HOST_TRUNCATED
    if host_share_pick(index, share):
        return HOST_SHARE
    return ROUTE_DEVICE

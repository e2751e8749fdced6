"""`--decode device`: JPEG decode, resize and centre crop on the device (CUDA), behind one interface.

    workers (preprocess/worker.py BytePlacer)      backend (StreamBackend.submit_batch -> DeviceDecodeStage)
    ----------------------------------------      ---------------------------------------------------------
    read file -> sniff headers (jpeghead.py)       decode stream: zeros x[B, H, W, 3] uint8
      JPEG the device takes: bytes -> arena          host rows: H2D copy of their pixel rows
      anything else: exact decode -> pixel row       device rows: synchronize, JpegDecoder.decode(bytes)
                                                     -> resize shorter side (antialias) -> centre crop
                                                     -> x[row]; a row the decoder fails on: exact
                                                     decode of its bytes on the host (or a failure)
                                                   event `copied` (the slot is free again)
                                                   compute stream: wait(copied) -> InputAdapter + model

`JpegDecoder` is the one interface to the decoder library: `decode(list of uint8 CPU tensors)` ->
list of uint8 `[3, H, W]` RGB tensors on its device. `TorchvisionDecoder` is torchvision's
`decode_jpeg(..., device=...)` (nvJPEG on CUDA; libjpeg on the CPU, which the tests use as the
double), batched where torchvision takes lists (0.19+), else one call per image. torchvision marks
its image decoding deprecated from 0.29 in favour of TorchCodec; nvImageCodec is the other
candidate. Either fits behind `JpegDecoder` (register it in DECODERS).

This module is the decoder adapters and the resize-crop of a decoded tensor (`decode_into`);
Pillow's resampling on tensors is engine/backends/pilresample.py; the stage the cuda backend owns
(its decode stream and lock, the decoder, the host fallback, the meter) is
engine/backends/decodestage.py.

Known traps, each guarded here:
- the decode must not start while work queued on the stream may still write its buffers (H100
  memory corruption, pytorch/vision PR 9606): `TorchvisionDecoder.decode` synchronizes the
  current stream first (the fix TorchCodec carries);
- nvJPEG leaks memory on every decode with CUDA < 11.6: `check_cuda_runtime` refuses it;
- geometry: exact mode's (preprocess/geometry.py), so the crop box is the same; the pixels differ
  (nvJPEG's IDCT and chroma upsampling, the tensor resize): measured by
  bench/device_decode_agreement.py.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from engine.backends.pilresample import PIL_FILTERS, pil_coefficients, pil_resample  # noqa: F401 -- re-exported
from preprocess.geometry import crop_placement, resized_size

#: resize filters the tensor path has; exact mode's other filters (box, hamming, lanczos) do not exist there
TENSOR_FILTERS = ("nearest", "bilinear", "bicubic")
#: the oldest CUDA whose nvJPEG does not leak memory per decode
MIN_CUDA = (11, 6)


class DecodeRefused(RuntimeError):
    """The device path cannot run this configuration; the message says what to change."""


def check_cuda_runtime(version: Optional[str]) -> None:
    """Refuse nvJPEG on a CUDA runtime older than 11.6 (it leaks device memory on every decode)."""
    if not version:
        return
    try:
        major, minor = (int(v) for v in version.split(".")[:2])
    except ValueError:
        return
    if (major, minor) < MIN_CUDA:
        raise DecodeRefused(f"--decode device: torch is built with CUDA {version}, whose nvJPEG leaks device memory "
                            f"on every decode (fixed in CUDA 11.6); install a torch built for CUDA 11.6 or later, "
                            f"or use --decode exact / fast")


def _version(text: str) -> Tuple[int, int]:
    parts = text.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


class JpegDecoder:
    """One interface to a JPEG decoder library: a batch of compressed images -> RGB tensors."""

    name = "base"
    #: frame kinds it is given (preprocess/jpeghead.py KIND_BITS); the workers decode the rest
    kinds: Tuple[str, ...] = ("baseline",)

    def __init__(self, device: torch.device):
        self.device = device

    def decode(self, datas: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """uint8 1-D CPU tensors (one JPEG each) -> uint8 `[3, H, W]` RGB tensors on `self.device`.
        Raises when any image cannot be decoded (the caller then decodes one at a time)."""
        raise NotImplementedError

    def describe(self) -> Dict:
        return {"decoder": self.name, "device": str(self.device), "kinds": list(self.kinds)}


class TorchvisionDecoder(JpegDecoder):
    """`torchvision.io.decode_jpeg(..., device=...)`: nvJPEG on CUDA (the hardware JPEG engine for
    baseline JPEGs on A100/H100/H200), libjpeg on the CPU."""

    name = "torchvision"

    def __init__(self, device: torch.device):
        super().__init__(device)
        import torchvision
        from torchvision.io import ImageReadMode, decode_jpeg

        self._decode, self._rgb = decode_jpeg, ImageReadMode.RGB
        self.version = torchvision.__version__
        self.batched = _version(self.version) >= (0, 19)  # lists of tensors, one batched nvJPEG call

    def decode(self, datas: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if self.device.type == "cuda":
            # pytorch/vision PR 9606: the hardware decoder may write before work queued on the
            # stream has run; wait for it first
            torch.cuda.current_stream(self.device).synchronize()
        if self.batched and len(datas) > 1:
            return list(self._decode(list(datas), mode=self._rgb, device=self.device))
        return [self._decode(d, mode=self._rgb, device=self.device) for d in datas]

    def describe(self) -> Dict:
        return dict(super().describe(), torchvision=self.version, batched=self.batched)


DECODERS = {"torchvision": TorchvisionDecoder}


def make_decoder(name: str, device: torch.device) -> JpegDecoder:
    if name not in DECODERS:
        raise DecodeRefused(f"unknown JPEG decoder {name!r}; one of {', '.join(sorted(DECODERS))}")
    return DECODERS[name](device)


def _filter(interpolation: str):
    from torchvision.transforms import InterpolationMode

    if interpolation not in TENSOR_FILTERS:
        raise DecodeRefused(f"--decode device resizes with tensor filters ({', '.join(TENSOR_FILTERS)}); "
                            f"--interpolation {interpolation} is not one of them: use --decode exact or fast")
    return {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
            "bicubic": InterpolationMode.BICUBIC}[interpolation]


#: how the device path resizes: "pil" (Pillow's fixed-point resampling, computed on tensors only for
#: the crop) or "tensor" (torchvision's antialiased float resize of the whole image)
RESIZE_METHODS = ("pil", "tensor")


def resize_crop_into(img: torch.Tensor, out: torch.Tensor, resize, interpolation: str, method: str = "pil") -> None:
    """Resize a `[3, h, w]` uint8 image's shorter side (or to an `(h, w)` pair) with antialiasing
    and write its centre crop into `out` (`[crop_h, crop_w, 3]`, zeros where the crop pads), with
    exact mode's geometry (preprocess/geometry.py). `method` "pil": Pillow's own arithmetic
    (`pil_resample`), so the same decoded pixels give exact mode's crop bit for bit; "tensor":
    torchvision's `resize(..., antialias=True)` (within one level of Pillow's)."""
    _, h, w = img.shape
    crop_h, crop_w = out.shape[0], out.shape[1]
    new_w, new_h = resized_size(w, h, resize)
    (left, top, right, bottom), (dx, dy) = crop_placement(new_w, new_h, crop_h, crop_w)
    if (new_w, new_h) == (w, h):  # torchvision returns the image untouched at the target size
        part = img[:, top:bottom, left:right]
    elif method == "pil" and interpolation in PIL_FILTERS:
        part = pil_resample(img, new_w, new_h, (left, top, right, bottom), interpolation)
    else:
        from torchvision.transforms.functional import resize as tv_resize

        img = tv_resize(img, [new_h, new_w], interpolation=_filter(interpolation), antialias=True)
        part = img[:, top:bottom, left:right]
    out[dy:dy + bottom - top, dx:dx + right - left].copy_(part.permute(1, 2, 0))


def decode_into(decoder: JpegDecoder, datas: Sequence[torch.Tensor], out: torch.Tensor, rows: Sequence[int],
                resize, interpolation: str, method: str = "pil") -> List[Tuple[int, str]]:
    """Decode `datas` (one per entry of `rows`) and resize-crop each into `out[row]`. Returns
    `(row, why)` for each image the decoder failed on (their rows are left untouched)."""
    failed: List[Tuple[int, str]] = []
    if not rows:
        return failed
    try:
        images: List[Optional[torch.Tensor]] = list(decoder.decode(datas))
    except Exception:  # one bad image fails a batched call: find it, one at a time
        images = []
        for row, data in zip(rows, datas):
            try:
                images.append(decoder.decode([data])[0])
            except Exception as e:
                images.append(None)
                failed.append((row, f"{type(e).__name__}: {str(e)[:200]}"))
    for row, img in zip(rows, images):
        if img is None:
            continue
        if img.dim() != 3 or img.shape[0] != 3:
            failed.append((row, f"the decoder gave a {tuple(img.shape)} image, not [3, H, W]"))
            continue
        resize_crop_into(img, out[row], resize, interpolation, method)
    return failed

"""The device-decode stage (engine/backends/decodestage.py) on its own, on the CPU: the decoder's rows,
the host rows, the host fallback and a row both fail, in one DecodedBatch; its timing feeds the meter.
(tests/test_device_decode.py runs the same stage through the cuda backend and run_eval.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torchvision")

from engine.backends.decodestage import DecodedBatch, DecodeTiming, DeviceDecodeStage  # noqa: E402
from engine.backends.gpudecode import JpegDecoder, TorchvisionDecoder  # noqa: E402
from engine.pipeline.encoded import EncodedBatch  # noqa: E402
from preprocess import jpeghead as jh  # noqa: E402
from preprocess.decode import preprocess_into  # noqa: E402
from tests.test_cuda_backend import FAKE_DM, _Event  # noqa: E402

CPU = torch.device("cpu")
SIDE = 32


def _jpeg(w, h, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(base).resize((w, h), Image.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class Refusing(JpegDecoder):
    """The CPU decoder, refusing images longer than `limit` bytes (a device-only failure)."""

    name = "refusing"

    def __init__(self, limit):
        super().__init__(CPU)
        self.inner, self.limit = TorchvisionDecoder(CPU), limit

    def decode(self, datas):
        if any(len(d) > self.limit for d in datas):
            raise RuntimeError("refused")
        return self.inner.decode(datas)


def test_stage_decodes_falls_back_and_meters():
    good, big = _jpeg(90, 70, 1), _jpeg(200, 150, 2)
    broken = big[:600]  # refused by the device decoder, and Pillow fails it too
    stage = DeviceDecodeStage(FAKE_DM, CPU, Refusing(len(good)), SIDE, "bilinear", "pil", None,
                              lambda: _Event(blocking=True))
    arena = np.zeros(1 << 16, np.uint8)
    offsets = np.array([0, 8192, 0, 32768], np.int64)
    for o, d in ((0, good), (8192, big), (32768, broken)):
        arena[o:o + len(d)] = np.frombuffer(d, np.uint8)
    lengths = np.array([len(good), len(big), 0, len(broken)], np.int64)
    pixels = np.zeros((4, SIDE, SIDE, 3), np.uint8)
    pixels[2] = 200  # a row the workers decoded
    route = np.array([jh.ROUTE_DEVICE, jh.ROUTE_DEVICE, jh.HOST_COLOUR, jh.ROUTE_DEVICE], np.int8)
    batch = EncodedBatch(0, 0, 4, pixels, np.arange(4), np.zeros(4, np.int64), np.ones(4, bool),
                         arena=arena, offsets=offsets, lengths=lengths, route=route)
    got = stage.decode(batch, (SIDE, SIDE, 3))
    assert isinstance(got, DecodedBatch) and got.copied.recorded
    assert [r for r, _ in got.failed] == [3] and "truncated" in got.failed[0][1]
    assert list(batch.route) == [jh.ROUTE_DEVICE, jh.HOST_FALLBACK, jh.HOST_COLOUR, jh.ROUTE_DEVICE]
    exact = np.zeros((SIDE, SIDE, 3), np.uint8)
    preprocess_into(big, exact, SIDE, "bilinear", "exact")
    assert np.array_equal(got.x[1].numpy(), exact)  # the fallback is exact mode
    assert (got.x[2].numpy() == 200).all() and got.x[0].numpy().any()
    t = got.timing
    assert isinstance(t, DecodeTiming) and (t.device_images, t.host_images) == (3, 1)
    assert t.seconds()[1] == "host wall time of the decode section"  # the stand-in has no timing events
    stage.meter.add(t)
    rep = stage.describe()
    assert rep["jpeg_decoder"]["decoder"] == "refusing"
    assert rep["device_decode"]["device_images"] == 3 and rep["device_decode"]["batches"] == 1
    assert rep["device_decode"]["routes"] == {"device": 2, "host: grayscale/CMYK/YCCK/RGB-coded/12-bit": 1,
                                              "host: the device decoder failed on it": 1}

"""`--decode device` on the CPU: everything but nvJPEG itself.

The ring's byte arena, the workers' byte path (bytes in, or exact pixels for what the GPU decoder is
not given), header sniffing and routing, the resize and crop on tensors against exact mode, and the
whole path through run_eval with the cuda backend's code on the CPU (`DecodeMirror`: StreamBackend
with stubbed streams, as in tests/test_cuda_backend.py, and torchvision's CPU `decode_jpeg`, which
shares the API of the CUDA one, as the JpegDecoder).
"""

from __future__ import annotations

import asyncio
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from engine.backends.gpudecode import (DecodeRefused, JpegDecoder, TorchvisionDecoder, check_cuda_runtime,
                                       decode_into, resize_crop_into)
from engine.config import ConfigError, resolve_config
from engine.pipeline.encoded import DeviceDecodeSource, EncodedBatch, HostShareTuner
from engine.pipeline.session import make_ring
from engine.pipeline.ring import ALIGN, Ring, arena_from_size
from preprocess import jpeghead as jh
from preprocess.decode import preprocess_into
from tests.test_cuda_backend import CpuMirror, tiny_ts

SIDE = 32
CPU = torch.device("cpu")


def _photo(w, h, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BICUBIC)  # smooth, like a photo
    return img


def _jpeg(w=300, h=200, seed=0, mode="RGB", **kw):
    img = _photo(w, h, seed)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(w=300, h=200):
    buf = io.BytesIO()
    _photo(w, h).save(buf, "PNG")
    return buf.getvalue()


ALL = jh.KIND_BITS["baseline"]
BIG = 1 << 40


# ---------------------------------------------------------------- header sniff and routing

def test_sniff_reads_the_frame_header():
    head = jh.sniff(_jpeg(300, 200))
    assert (head.kind, head.width, head.height, head.components, head.precision) == ("baseline", 300, 200, 3, 8)
    assert head.has_eoi and head.adobe_transform is None
    assert jh.sniff(_jpeg(64, 48, progressive=True)).kind == "progressive"
    assert jh.sniff(_jpeg(64, 48, mode="L")).components == 1
    cmyk = jh.sniff(_jpeg(64, 48, mode="CMYK"))
    assert cmyk.components == 4 and cmyk.adobe_transform is not None  # Pillow writes an Adobe segment
    assert jh.sniff(_png()) is None and jh.sniff(b"") is None and jh.sniff(b"\xff\xd8\xff") is None


@pytest.mark.parametrize("make, expected", [
    (lambda: _jpeg(), jh.ROUTE_DEVICE),
    (lambda: _jpeg(progressive=True), jh.HOST_KIND),
    (lambda: _jpeg(mode="L"), jh.HOST_COLOUR),
    (lambda: _jpeg(mode="CMYK"), jh.HOST_COLOUR),
    (lambda: _png(), jh.HOST_NOT_JPEG),
    (lambda: b"not an image at all", jh.HOST_NOT_JPEG),
    (lambda: _jpeg()[:-3000], jh.HOST_TRUNCATED),
    (lambda: _jpeg()[:200], jh.HOST_NOT_JPEG),  # cut inside the headers
])
def test_routes(make, expected):
    assert jh.route(make(), ALL, BIG) == expected


def test_route_limits_kinds_and_share():
    data = _jpeg(300, 200)
    assert jh.route(data, ALL, 300 * 200 - 1) == jh.HOST_TOO_BIG  # over the pixel limit: the host fails it
    prog = _jpeg(progressive=True)
    assert jh.route(prog, ALL | jh.KIND_BITS["progressive"], BIG) == jh.ROUTE_DEVICE  # a decoder that takes them
    picks = [jh.host_share_pick(i, 0.25) for i in range(4000)]
    assert abs(sum(picks) / 4000 - 0.25) < 0.01  # evenly spread
    assert sum(picks[:40]) in range(8, 13)  # also over a short run of images
    assert not any(jh.host_share_pick(i, 0.0) for i in range(100))
    assert all(jh.host_share_pick(i, 1.0) for i in range(100))
    shared = [jh.route(data, ALL, BIG, 0.5, i) for i in range(200)]
    assert set(shared) == {jh.ROUTE_DEVICE, jh.HOST_SHARE}


# ---------------------------------------------------------------- the ring's byte arena

def test_ring_arena_layout_and_attach():
    with Ring(3, 5, (SIDE, SIDE, 3), arena=5 * 10000) as ring:
        lay = ring.layout
        assert ring.arena_per_image % ALIGN == 0 and ring.arena_per_image >= 8192
        assert lay.arena_bytes == 5 * ring.arena_per_image
        assert lay.size == lay.arena_at + 3 * lay.arena_bytes
        # every array in its own bytes, in order, after the pixels
        assert lay.pixels_at + 3 * lay.slot_bytes <= lay.offsets_at < lay.lengths_at < lay.route_at \
            < lay.control_at < lay.arena_at
        assert arena_from_size(lay.size, 3, 5, (SIDE, SIDE, 3)) == lay.arena_bytes
        ring.arena(2)[-4:] = [1, 2, 3, 4]
        ring.offsets[1, 4], ring.lengths[1, 4], ring.route[1, 4] = 77, 99, jh.HOST_SHARE
        ring.control[0] = 0.25
        ring.pixels(2)[-1, -1, -1, -1] = 9
        other = Ring.attach(ring.name, 3, 5, (SIDE, SIDE, 3), arena=-1)
        try:
            assert other.arena_per_image == ring.arena_per_image
            assert list(other.arena(2)[-4:]) == [1, 2, 3, 4]
            assert (other.offsets[1, 4], other.lengths[1, 4], other.route[1, 4]) == (77, 99, jh.HOST_SHARE)
            assert other.control[0] == 0.25 and other.pixels(2)[-1, -1, -1, -1] == 9
        finally:
            other.close()
    plain = Ring(2, 4, (SIDE, SIDE, 3))
    try:
        assert plain.route is None and plain.arena_per_image == 0
    finally:
        plain.close()


def _cfg(ts=None, data=None, **kw):
    base = dict(ts=ts, backend="cuda", precision="fp32", batch_size=8, workers=2, progress=False,
                compute_only_iters=1, data=data)
    base.update(kw)
    pre = {"resize": kw.pop("resize", SIDE), "crop": SIDE, "decode": "device"}
    base.pop("resize", None)
    return resolve_config("tiny", pre, **base)


def test_config_and_cli_options():
    from engine.cli import eval_parser, config_from_args

    a = eval_parser().parse_args(["--data", "x", "--decode", "device", "--host-decode-share", "0.3",
                                  "--decode-arena-kib", "512", "--backend", "cpu"])
    cfg = config_from_args(a)
    assert (cfg.preprocess.decode, cfg.device_decode.host_decode_share, cfg.device_decode.arena_kib) == ("device", 0.3, 512)
    a = eval_parser().parse_args(["--data", "x", "--decode", "device", "--host-decode-share", "auto",
                                  "--backend", "cpu"])
    assert config_from_args(a).device_decode.host_decode_share == -1.0
    with pytest.raises(SystemExit):
        eval_parser().parse_args(["--data", "x", "--host-decode-share", "1.5"])
    with pytest.raises(ConfigError, match="host-decode-share"):
        _cfg(host_decode_share=2.0)
    assert "device" in eval_parser().format_help()
    ring = make_ring(_cfg(decode_arena_kib=64))
    try:
        assert ring.arena_per_image == 64 * 1024
    finally:
        ring.close()


# ---------------------------------------------------------------- the workers' byte path

def _files(tmp_path):
    """(name, bytes, expected route or None for a failure) for every kind the router knows."""
    big = _jpeg(2000, 1500, seed=3)  # larger than a 64 KiB arena share: decoded by the host
    return [
        ("a.JPEG", _jpeg(300, 200, 1), jh.ROUTE_DEVICE),
        ("b.JPEG", _jpeg(180, 260, 2), jh.ROUTE_DEVICE),
        ("c.JPEG", _jpeg(300, 200, 4, progressive=True), jh.HOST_KIND),
        ("d.JPEG", _jpeg(300, 200, 5, mode="L"), jh.HOST_COLOUR),
        ("e.JPEG", _jpeg(300, 200, 6, mode="CMYK"), jh.HOST_COLOUR),
        ("f.JPEG", _png(), jh.HOST_NOT_JPEG),
        ("g.JPEG", b"garbage, not an image", None),  # not a JPEG: the host fails it with exact mode's reason
        ("h.JPEG", big, jh.HOST_TOO_BIG),
    ]


def test_worker_byte_path(tmp_path):
    from preprocess.worker import BytePlacer, run_job

    files = _files(tmp_path)
    rows = []
    for r, (name, data, _) in enumerate(files):
        (tmp_path / name).write_bytes(data)
        rows.append((r, str(tmp_path / name)))
    n = len(files)
    with Ring(2, n, (SIDE, SIDE, 3), arena=n * 64 * 1024) as ring:
        ring.control[1] = jh.KIND_BITS["baseline"]
        ring.control[2] = 1 << 30
        ring.indices[1, :n] = range(n)
        ring.status[1, :] = 0
        failures, error = run_job(ring, 1, rows, SIDE, "bilinear", "device", 1 << 30, None,
                                  BytePlacer(ring, 1, rows, SIDE, "bilinear", 1 << 30))
        assert error is None
        from preprocess.decode import DecodeError

        with pytest.raises(DecodeError) as exact_error:
            preprocess_into(files[6][1], np.zeros((SIDE, SIDE, 3), np.uint8), SIDE, "bilinear", "exact")
        assert failures == [(6, str(exact_error.value))]  # exact mode's reason
        for r, (name, data, expected) in enumerate(files):
            if expected is None:
                assert ring.status[1, r] == 3  # FAILED, with a reason, as in exact mode
                continue
            assert ring.status[1, r] == 2 and ring.route[1, r] == expected, (name, ring.route[1, r])
            if expected == jh.ROUTE_DEVICE:  # the file's bytes, unchanged, inside the arena
                o, ln = ring.offsets[1, r], ring.lengths[1, r]
                assert bytes(ring.arena(1)[o:o + ln]) == data
            else:  # exact mode's pixels
                ref = np.zeros((SIDE, SIDE, 3), np.uint8)
                preprocess_into(data, ref, SIDE, "bilinear", "exact")
                assert np.array_equal(ring.pixels(1)[r], ref), name
        # the device rows' bytes do not overlap
        spans = sorted((ring.offsets[1, r], ring.offsets[1, r] + ring.lengths[1, r])
                       for r in range(n) if ring.route[1, r] == jh.ROUTE_DEVICE)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_a_redone_job_does_not_overwrite_finished_rows(tmp_path):
    """A worker died after placing row 0 (which used more than its own share of the chunk's room):
    the job for rows 1.. starts after row 0's bytes."""
    from preprocess.worker import BytePlacer

    per = 4096
    with Ring(1, 4, (SIDE, SIDE, 3), arena=4 * per) as ring:
        ring.control[1], ring.control[2] = ALL, 1 << 30
        ring.status[0, :] = 0
        ring.indices[0, :] = range(4)
        first = _jpeg(120, 90, 1)
        assert per < len(first) < 2 * per
        place = BytePlacer(ring, 0, [(0, "a"), (1, "b")], SIDE, "bilinear", 1 << 30)
        place(first, 0)
        ring.status[0, 0] = 2
        redo = BytePlacer(ring, 0, [(1, "b")], SIDE, "bilinear", 1 << 30)
        assert redo.cursor == len(first)


# ---------------------------------------------------------------- the tensor resize and crop

def _exact(data, resize=256, crop=224, interpolation="bilinear"):
    out = np.zeros((crop, crop, 3), np.uint8)
    preprocess_into(data, out, resize, interpolation, "exact")
    return out


def _device(data, resize=256, crop=224, interpolation="bilinear", method="pil"):
    out = torch.zeros((1, crop, crop, 3), dtype=torch.uint8)
    dec = TorchvisionDecoder(CPU)
    failed = decode_into(dec, [torch.frombuffer(bytearray(data), dtype=torch.uint8)], out, [0], resize,
                         interpolation, method)
    assert not failed
    return out[0].numpy()


SIZES = [(500, 375), (375, 500), (256, 256), (224, 300), (1024, 683), (150, 100), (4000, 3000), (83, 1200)]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("resize, crop", [(256, 224), (50, 80), ((200, 120), 64), (342, 299)])
def test_pil_resample_is_pillows_arithmetic(interpolation, resize, crop):
    """--device-resize pil: from the same decoded pixels, the crop is exact mode's bit for bit
    (Pillow's fixed-point two-pass resampling, pillow-simd's 16-bit variant where installed)."""
    rng = np.random.default_rng(crop)
    for w, h in SIZES:
        img = Image.fromarray(rng.integers(0, 256, (h // 7 + 1, w // 7 + 1, 3), dtype=np.uint8)).resize((w, h))
        buf = io.BytesIO()
        img.save(buf, "PNG")  # lossless: exact mode decodes the same pixels
        ref = _exact(buf.getvalue(), resize, crop, interpolation)
        out = torch.zeros((crop, crop, 3), dtype=torch.uint8)
        resize_crop_into(torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous(), out, resize,
                         interpolation, "pil")
        assert np.array_equal(out.numpy(), ref), (w, h, np.abs(out.numpy().astype(int) - ref).max())


@pytest.mark.parametrize("w, h", SIZES[:6])
@pytest.mark.parametrize("method", ["pil", "tensor"])
def test_device_path_is_close_to_exact(w, h, method):
    """torchvision's CPU decode + the resize vs exact mode (libjpeg-turbo + Pillow): the same crop box
    (the geometry is exact mode's); with the pil resize the same pixels wherever the two libjpeg-turbo
    builds decode alike, with the tensor resize within a level or two."""
    data = _jpeg(w, h, seed=w + h)
    a, b = _exact(data).astype(int), _device(data, method=method).astype(int)
    diff = np.abs(a - b)
    if method == "pil":
        assert diff.mean() < 0.01 and diff.max() <= 2, (diff.mean(), diff.max())
    else:
        assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4, (diff.mean(), diff.max())


def test_crop_larger_than_image_pads_with_zeros_like_exact():
    data = _jpeg(100, 60, seed=1)
    a, b = _exact(data, resize=50, crop=80), _device(data, resize=50, crop=80)
    from preprocess.geometry import crop_padding

    left, top, right, bottom = crop_padding(83, 50, 80, 80)  # 100x60 resized to 83x50
    assert (left, top, right, bottom) == (0, 15, 0, 15)
    for img in (a, b):  # the padding is zeros in both, the image is not
        assert not img[:top].any() and not img[80 - bottom:].any() and img[top:80 - bottom].all(axis=2).mean() > 0.9
    assert np.abs(a.astype(int) - b.astype(int))[top:80 - bottom].mean() < 1.0


def test_resize_pairs_and_refused_filters():
    img = torch.randint(0, 256, (3, 120, 200), dtype=torch.uint8)
    out = torch.zeros((64, 64, 3), dtype=torch.uint8)
    resize_crop_into(img, out, (64, 100), "bicubic")
    assert out.sum() > 0
    with pytest.raises(DecodeRefused, match="--interpolation lanczos"):
        resize_crop_into(img, out, 64, "lanczos")  # no Pillow arithmetic for it here, no tensor filter either


def test_decode_into_finds_the_bad_image_of_a_batch():
    good, bad = _jpeg(80, 60, 1), _jpeg(80, 60, 2)[:400] + b"\xff\xd9"
    datas = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in (good, bad, good)]
    out = torch.zeros((3, SIDE, SIDE, 3), dtype=torch.uint8)
    failed = decode_into(TorchvisionDecoder(CPU), datas, out, [0, 1, 2], SIDE, "bilinear")
    assert [r for r, _ in failed] == [1]
    assert out[0].sum() > 0 and out[2].sum() > 0 and torch.equal(out[0], out[2])


def test_cuda_before_11_6_is_refused():
    with pytest.raises(DecodeRefused, match="leaks"):
        check_cuda_runtime("11.4")
    check_cuda_runtime("11.6")
    check_cuda_runtime("12.8")
    check_cuda_runtime(None)  # a CPU build of torch: nothing to check


class _Counting(JpegDecoder):
    """The decoder interface, swapped in: the CPU decoder, counting calls and images."""

    name = "counting"

    def __init__(self, device):
        super().__init__(device)
        self.inner, self.calls = TorchvisionDecoder(device), []

    def decode(self, datas):
        self.calls.append(len(datas))
        return self.inner.decode(datas)


# ---------------------------------------------------------------- the whole path, on the CPU

class DecodeMirror(CpuMirror):
    """The cuda backend's code on the CPU, with --decode device (TorchvisionDecoder on the CPU)."""


@pytest.fixture(scope="module")
def model_ts(tmp_path_factory):
    return tiny_ts(str(tmp_path_factory.mktemp("devdec") / "tiny.ts"))


@pytest.fixture(scope="module")
def mixed_set(tmp_path_factory):
    """An ImageFolder of 40 images: synthetic ImageNet-like JPEGs (some grayscale, CMYK,
    progressive) plus a PNG named .JPEG and two corrupt files."""
    from engine.synthetic import make_dataset

    root = tmp_path_factory.mktemp("mixed")
    make_dataset(str(root), 37, 3, layout="folder", seed=5)
    cls = sorted(p for p in os.listdir(root))[0]
    (root / cls / "zz_png.JPEG").write_bytes(_png(120, 90))
    (root / cls / "zz_empty.JPEG").write_bytes(b"")
    (root / cls / "zz_trunc.JPEG").write_bytes(_jpeg(200, 150, 9)[:300])
    return str(root)


def _eval(monkeypatch, cfg, cls):
    import engine.evaluate as ev
    import engine.pipeline.session as session

    if cls is not None:  # the Session creates the run's backend
        monkeypatch.setattr(session, "create_backend", lambda c: cls(c))
    return ev.run_eval(cfg, out=io.StringIO())


@pytest.mark.parametrize("share", [0.0, 0.5, -1.0])
def test_run_eval_device_decode_counts_every_image(monkeypatch, mixed_set, model_ts, share):
    """The cuda backend's device path on the CPU through run_eval: every image counted once, the
    same failures with the same reasons as exact mode, and top-1 within the tensor path's noise."""
    exact = resolve_config("tiny", {"resize": SIDE, "crop": SIDE}, ts=model_ts, data=mixed_set, backend="cpu",
                           precision="fp32", batch_size=8, workers=2, progress=False, compute_only_iters=1)
    ref, ref_status = _eval(monkeypatch, exact, None)
    got, status = _eval(monkeypatch, _cfg(model_ts, mixed_set, host_decode_share=share), DecodeMirror)
    assert status == ref_status == 1  # the corrupt files failed in both
    assert got["images"] == ref["images"] == 38  # scored; 40 files
    assert got["failed"] == ref["failed"] == 2
    assert sorted(f["path"] for f in got["failures"]) == sorted(f["path"] for f in ref["failures"])
    assert sorted(f["reason"] for f in got["failures"]) == sorted(f["reason"] for f in ref["failures"])
    dd = got["device_decode"]
    assert dd["device_images"] + dd["host_images"] == 38
    routes = dd["routes"]
    assert routes.get("device", 0) == dd["device_images"] > 0
    assert routes.get(jh.ROUTE_NAMES[jh.HOST_NOT_JPEG], 0) == 1  # the PNG, decoded by the host
    if share == 0.0:
        assert jh.ROUTE_NAMES[jh.HOST_SHARE] not in routes
    if share == 0.5:
        assert routes[jh.ROUTE_NAMES[jh.HOST_SHARE]] > 0
    assert dd["host_share"]["mode"] == ("auto" if share < 0 else "fixed")
    assert abs(got["correct_top1"] - ref["correct_top1"]) <= 2


def test_other_backends_refuse_device_decode(monkeypatch, mixed_set, model_ts):
    from engine.backends.base import BackendError

    with pytest.raises(BackendError, match="--decode device needs --backend cuda"):
        import engine.evaluate as ev

        cfg = _cfg(model_ts, mixed_set, backend="cpu")
        ev.run_eval(cfg, out=io.StringIO())


def test_submit_batch_uses_the_decoder_interface_and_falls_back_to_exact(model_ts):
    """A batch with device rows (one of them undecodable by the device decoder but fine for Pillow)
    and host rows: one decode call for the device rows, the failing one decoded exactly on the host."""
    b = DecodeMirror(_cfg(model_ts))
    b.prepare(4)
    good = _jpeg(90, 70, 1)
    calls = []

    class Picky(_Counting):
        """Refuses the image one byte longer than `good` (a decoder failure Pillow does not share)."""

        def decode(self, datas):
            calls.append(len(datas))
            if any(len(d) == len(good) + 1 for d in datas):
                raise RuntimeError("picky decoder")
            return self.inner.decode(datas)

    b.jpeg = Picky(CPU)
    odd = good + b"\x00"  # Pillow decodes it; the picky decoder refuses it
    arena = np.zeros(4096 * 8, np.uint8)
    arena[:len(good)] = np.frombuffer(good, np.uint8)
    arena[8192:8192 + len(odd)] = np.frombuffer(odd, np.uint8)
    pixels = np.zeros((4, SIDE, SIDE, 3), np.uint8)
    pixels[2] = 200
    route = np.array([jh.ROUTE_DEVICE, jh.ROUTE_DEVICE, jh.HOST_COLOUR, jh.ROUTE_DEVICE], np.int8)
    offsets = np.array([0, 8192, 0, 0], np.int64)
    lengths = np.array([len(good), len(odd), 0, len(good)], np.int64)
    batch = EncodedBatch(0, 0, 4, pixels, np.arange(4), np.zeros(4, np.int64), np.ones(4, bool),
                         arena=arena, offsets=offsets, lengths=lengths, route=route)
    job = b.submit_batch(batch)
    job.copied()
    logits = job.result()
    assert logits.shape == (4, 1000) and job.failed_rows() == []
    assert calls[0] == 3  # one batched call for the three device rows
    assert batch.route[1] == jh.HOST_FALLBACK
    # the fallback row holds exact mode's pixels: its logits equal those of the exact crop
    ref = b.submit(np.stack([_exact(good, SIDE, SIDE)] * 4))
    ref.copied()
    assert np.allclose(logits[1], ref.result()[0], atol=1e-4)
    assert b.decode_meter.device_images == 3 and b.decode_meter.host_images == 1
    b.close()


def test_host_share_tuner():
    t = HostShareTuner(workers=4)
    assert t.share == t.probe  # nothing measured yet
    t.observe_host(0.010 * 100, 100)  # 10 ms per exact decode on one worker
    t.observe_read(0.0005 * 100, 100)  # 0.5 ms to read a file
    t.observe_device(1.0, 1000)  # the device decodes 1000 img/s
    # a = 4 / 1000 = 4 ms of worker time per device image: s = (4 - 0.5) / (4 - 0.5 + 10)
    assert abs(t.share - 3.5 / 13.5) < 1e-9
    t.observe_device(0.0, 1_000_000)  # a very fast device: the host decodes none
    assert t.share == 0.0
    assert HostShareTuner(4, share=0.3).share == 0.3
    slow = HostShareTuner(16)
    slow.observe_host(0.01, 1)
    slow.observe_read(0.0001, 1)
    slow.observe_device(10.0, 1)  # a very slow device: capped
    assert slow.share == slow.max_share


def test_device_source_feeds_the_tuner_and_sets_the_share():
    """DeviceDecodeSource writes the tuner's share into the ring before each batch and reads back
    the workers' decode times by route."""
    from engine.pipeline.pool import Fill

    with Ring(2, 4, (SIDE, SIDE, 3), arena=4 * 4096) as ring:
        tuner = HostShareTuner(2, share=0.2)

        class _Pool:
            def fill(self, slot, batch_no, start, n):
                fut = asyncio.get_running_loop().create_future()
                ring.status[slot, :n] = 2
                ring.route[slot, :n] = [jh.ROUTE_DEVICE, jh.HOST_SHARE, jh.HOST_SHARE, jh.HOST_KIND]
                ring.decode_ns[slot, :n] = [1_000_000, 8_000_000, 12_000_000, 5_000_000]
                fut.set_result(Fill(slot, batch_no, start, n, fut))
                return fut

        src = DeviceDecodeSource(_Pool(), ring, 0, tuner)

        async def go():
            fut = await src.fill(0, 0, 4)
            return await fut

        batch = asyncio.run(go())
        assert isinstance(batch, EncodedBatch) and list(batch.route) == [1, 2, 2, 3]
        assert ring.control[0] == 0.2
        assert tuner.host_n == 2 and abs(tuner.host_s - 0.020) < 1e-12
        assert tuner.read_n == 1 and abs(tuner.read_s - 0.001) < 1e-12
        batch.release()


def test_run_score_device_decode(monkeypatch, mixed_set, model_ts, tmp_path):
    """run-score --decode device (the cuda backend's code on the CPU): a row for every image, the
    corrupt files as error rows with exact mode's reasons."""
    import engine.backends
    from engine.scoring.run import run_score_main
    from tests.test_score import read_rows

    monkeypatch.setattr(engine.backends, "create_backend", lambda c: DecodeMirror(c))
    common = ["--data", mixed_set, "--ts", model_ts, "--backend", "cuda", "--precision", "fp32", "--resize",
              str(SIDE), "--crop", str(SIDE), "--batch-size", "8", "--workers", "2", "--format", "jsonl",
              "--part-size", "16", "--no-progress"]
    status = run_score_main(common + ["--out", str(tmp_path / "dev"), "--decode", "device"])
    assert status == 1  # two files failed
    rows = {r["path"]: r for r in read_rows(str(tmp_path / "dev"))}
    assert len(rows) == 40
    errors = {p: r["error"] for p, r in rows.items() if r["error"]}
    assert sorted(os.path.basename(p) for p in errors) == ["zz_empty.JPEG", "zz_trunc.JPEG"]
    monkeypatch.setattr(engine.backends, "create_backend", lambda c: CpuMirror(c))
    assert run_score_main(common + ["--out", str(tmp_path / "exact"), "--decode", "exact"]) == 1
    exact = {r["path"]: r for r in read_rows(str(tmp_path / "exact"))}
    assert {p: r["error"] for p, r in exact.items() if r["error"]} == errors
    same = sum(rows[p]["topk_index"] == exact[p]["topk_index"] for p in rows if not rows[p]["error"])
    assert same >= 36  # of 38: the device path's pixels differ by a level here and there


def test_pixel_agreement_on_synthetic_imagenet_like_images(mixed_set):
    """bench/device_decode_agreement.py's pairing on engine.synthetic images: the device-routed
    images' pixels (torchvision's CPU decoder + tensor resize) against exact mode, and a
    classifier's top-1 (the proxy: fast, deterministic) unchanged."""
    from bench.device_decode_agreement import measure, preprocess_pair
    from engine.pipeline.dataset import build_dataset
    from engine.report.agreement import proxy

    ds = build_dataset(mixed_set)
    paths = [ds.abspath(i) for i in range(len(ds))]
    diffs, routes = [], []
    for _idx, exact, dev, route in preprocess_pair(paths, "cpu", batch=16):
        on = route == jh.ROUTE_DEVICE
        assert np.array_equal(exact[~on], dev[~on])  # host-routed: exact mode's pixels
        diffs.append(np.abs(exact[on].astype(int) - dev[on].astype(int)))
        routes.extend(route.tolist())
    d = np.concatenate(diffs)
    assert len(routes) == 38 and routes.count(jh.ROUTE_DEVICE) >= 25
    assert d.mean() < 0.05 and d.max() <= 2, (d.mean(), d.max())  # the pil resize: Pillow's arithmetic
    r = measure(paths, proxy(), "cpu", batch=16)
    assert r["images"] == 38 and r["agreement_pct"] >= 97.0 and r["pixel_mean_abs_diff"] == pytest.approx(d.mean())


# ---------------------------------------------------------------- on a GPU (skipped without CUDA)

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


@needs_cuda
def test_cuda_decode_is_close_to_the_cpu_decoder_and_exact():
    """nvJPEG + the tensor resize on the GPU against the same code on the CPU and against exact mode."""
    datas = [_jpeg(w, h, seed=w) for w, h in ((500, 375), (375, 500), (640, 480), (300, 300), (1024, 683))]
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    gpu = torch.zeros((len(datas), 224, 224, 3), dtype=torch.uint8, device="cuda")
    cpu = torch.zeros((len(datas), 224, 224, 3), dtype=torch.uint8)
    rows = list(range(len(datas)))
    assert not decode_into(TorchvisionDecoder(torch.device("cuda")), tensors, gpu, rows, 256, "bilinear")
    assert not decode_into(TorchvisionDecoder(CPU), tensors, cpu, rows, 256, "bilinear")
    exact = np.stack([_exact(d) for d in datas]).astype(int)
    g = gpu.cpu().numpy().astype(int)
    for ref in (cpu.numpy().astype(int), exact):
        d = np.abs(g - ref)
        assert d.mean() < 1.5 and np.percentile(d, 99) <= 8, (d.mean(), np.percentile(d, 99), d.max())


@needs_cuda
def test_cuda_decoder_waits_for_queued_work_first(monkeypatch):
    """pytorch/vision PR 9606: when the decoder starts, no work queued on the stream is pending."""
    dec = TorchvisionDecoder(torch.device("cuda"))
    seen = []
    inner = dec._decode

    def spy(*args, **kw):
        seen.append(torch.cuda.current_stream().query())
        return inner(*args, **kw)

    dec._decode = spy
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        a = a @ a  # queued work, still running when decode is called
        a = a / a.norm()
    dec.decode([torch.frombuffer(bytearray(_jpeg(64, 48)), dtype=torch.uint8)] * 2)
    assert seen and all(seen), seen


@needs_cuda
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_run_eval_device_decode(monkeypatch, mixed_set, model_ts, graphs):
    """The real cuda backend with --decode device: every image counted once, exact mode's failures,
    top-1 within the decoders' noise, slots reused (2 ring slots, 5 batches), the decode stage timed."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    exact = resolve_config("tiny", {"resize": SIDE, "crop": SIDE}, ts=model_ts, data=mixed_set, backend="cpu",
                           precision="fp32", batch_size=8, workers=2, progress=False, compute_only_iters=1)
    ref, _ = _eval(monkeypatch, exact, None)
    got, status = _eval(monkeypatch, _cfg(model_ts, mixed_set, ring_slots=2, cuda_graphs=graphs), None)
    assert status == 1 and got["images"] == ref["images"] == 38 and got["failed"] == 2
    assert sorted(f["reason"] for f in got["failures"]) == sorted(f["reason"] for f in ref["failures"])
    assert abs(got["correct_top1"] - ref["correct_top1"]) <= 2
    dd = got["device_decode"]
    assert dd["device_images"] > 0 and dd["timing"] == "device events on the decode stream"
    assert got["backend"]["jpeg_decoder"]["device"].startswith("cuda")


def test_profile_names_the_device_decoder_when_it_is_the_bound():
    from engine.report.profile import with_device_decode

    def prof(ratio):
        return {"device_capacity": 10000.0, "ratio": ratio, "per_batch": {"batches": 10}, "bound": "copy",
                "verdict": "copy-bound"}

    dd = {"device_images": 900, "host_images": 100, "device_decode_img_per_s": 4500.0,
          "host_share": {"share": 0.05}}
    p = with_device_decode(prof(0.5), dd)
    assert p["bound"] == "device-decode" and "5,000 img/s in all" in p["verdict"]
    assert abs(p["device_decode"]["capacity"] - 5000.0) < 1e-6
    fast = dict(dd, device_decode_img_per_s=45000.0)
    assert with_device_decode(prof(0.5), fast)["bound"] == "copy"  # the decoder keeps up: not it
    assert with_device_decode(prof(0.97), dd)["bound"] == "copy"  # device-bound already
    assert with_device_decode(prof(0.5), None)["bound"] == "copy"

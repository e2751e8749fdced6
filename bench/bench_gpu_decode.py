#!/usr/bin/env python3
"""Device decode rate alone (decode + resize + centre crop, no model), per batch size, beside the
host pool's rate on the same files.

Device: the files' bytes are read into memory once; per batch, `JpegDecoder.decode` (torchvision's
`decode_jpeg`, nvJPEG on CUDA) then `resize_crop_into` for each image into a uint8 [B, 224, 224, 3]
batch on the device (engine/backends/gpudecode.py, the code `--decode device` runs), ending
synchronised; img/s over the JPEGs the device path takes (the others go to the host and are counted
apart). With both resizes (`--device-resize pil`, the default, and `tensor`), and the decode call
alone, to show what the resize costs.
Host: the decode pool (all `--workers`) on the same files through the simulated backend with no
device time (bench/_common.run_pool): exact and fast mode img/s, the workers' start included (a
second or so of a run of `--limit` files).

    bench/bench_gpu_decode.py --data DIR --device cuda --batch-sizes 32,64,128,256 --workers 16

`--device cpu` runs the same code with torchvision's CPU decoder (a check of the script, not a
figure for the GPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench._common import result_block, run_pool  # noqa: E402


def device_rate(datas, device: str, batch: int, seconds: float = 3.0, resize=256, crop=224, with_resize=True,
                method: str = "pil"):
    """img/s of decode (+ resize + crop) on `device`, batches of `batch`, for about `seconds`."""
    import torch

    from engine.backends.gpudecode import decode_into, make_decoder

    dev = torch.device(device)
    decoder = make_decoder("torchvision", dev)
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    if dev.type == "cuda":
        tensors = [t.pin_memory() for t in tensors]
    out = torch.zeros((batch, crop, crop, 3), dtype=torch.uint8, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def one(lo):
        chunk = [tensors[(lo + j) % len(tensors)] for j in range(batch)]
        if with_resize:
            failed = decode_into(decoder, chunk, out, list(range(batch)), resize, "bilinear", method)
            assert not failed, failed[:3]
        else:
            decoder.decode(chunk)

    one(0)  # warm-up: nvJPEG handles, allocator, kernels
    sync()
    images, lo = 0, 0
    t = time.perf_counter()
    while time.perf_counter() - t < seconds or images < 2 * batch:
        one(lo)
        lo += batch
        images += batch
    sync()
    return images / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="an image folder")
    p.add_argument("--limit", type=int, default=2000, help="files to use (default: %(default)s)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-sizes", default="32,64,128,256")
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement (default: %(default)s)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--no-host", action="store_true", help="skip the host pool's figures")
    a = p.parse_args(argv)

    from engine.pipeline.dataset import build_dataset
    from preprocess.jpeghead import KIND_BITS, ROUTE_DEVICE, route

    ds = build_dataset(a.data, limit=a.limit)
    datas, others = [], 0
    for i in range(len(ds)):
        with open(ds.abspath(i), "rb") as f:
            data = f.read()
        if route(data, KIND_BITS["baseline"], 1 << 62) == ROUTE_DEVICE:
            datas.append(data)
        else:
            others += 1
    print(f"{len(ds)} files: {len(datas)} JPEGs the device path takes, {others} for the host "
          f"(progressive, grayscale, CMYK, ...)")
    rows = []
    for b in [int(x) for x in a.batch_sizes.split(",")]:
        full = device_rate(datas, a.device, b, a.seconds, method="pil")
        tensor = device_rate(datas, a.device, b, a.seconds / 2, method="tensor")
        alone = device_rate(datas, a.device, b, a.seconds / 2, with_resize=False)
        rows.append({"batch": b, "decode_resize_crop_img_per_s": full, "decode_tensor_resize_crop_img_per_s": tensor,
                     "decode_only_img_per_s": alone})
        print(f"  {a.device} batch {b:4d}: decode+resize+crop {full:9,.0f} img/s (pil resize; tensor resize "
              f"{tensor:,.0f})   decode alone {alone:9,.0f} img/s", flush=True)
    host = {}
    if not a.no_host:
        for mode in ("exact", "fast"):
            n, s, _, _ = run_pool(a.data, a.workers, 64, limit=a.limit, decode=mode)
            host[mode] = n / s
            print(f"  host pool, {a.workers} workers, {mode}: {n / s:9,.0f} img/s (worker start included)", flush=True)
    result_block("gpu_decode", device=a.device, files=len(ds), device_jpegs=len(datas), host_routed=others,
                 device_rates=rows, host_pool_img_per_s=host, workers=a.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Top-1 agreement and pixel differences of `--decode device` against exact mode.

Every image goes where `--decode device` sends it (preprocess/jpeghead.py: the JPEGs the device
decoder takes through `engine.backends.gpudecode.decode_into`, the rest through exact mode, as the
workers would); one classifier scores both preprocessings; the figure is the share of images whose
top-1 class is unchanged (gate: at least 99.5 %), with the mean and max absolute pixel difference
over the device-decoded images.

    --device cpu   torchvision's CPU decode_jpeg (libjpeg-turbo) + the device path's resize: what CI can measure.
                   The device's own IDCT and chroma upsampling (nvJPEG) are NOT measured this way.
    --device cuda  the real path: nvJPEG (torchvision decode_jpeg on the GPU) + the resize on the GPU.

The classifier is the pretrained EfficientNet-Lite0 from its PyPI wheels where installed, else the
proxy of engine/report/agreement.py (the output says which). Data: --data DIR (any image folder),
else a synthetic ImageNet-like set of --images JPEGs (sizes, grayscale, CMYK and progressive files
in ImageNet validation's proportions), made once under .cache/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GATE_PCT = 99.5


def preprocess_pair(paths, device: str, resize=256, crop=224, interpolation="bilinear", batch: int = 64,
                    method: str = "pil"):
    """Yield (indices, exact uint8 [n, crop, crop, 3], device-path uint8 [n, ...], routes [n]) per batch;
    images exact mode fails on are left out (they fail the same way on the device path)."""
    import torch

    from engine.backends.gpudecode import decode_into, make_decoder
    from preprocess.decode import DecodeError, preprocess_into
    from preprocess.jpeghead import KIND_BITS, ROUTE_DEVICE, route

    decoder = make_decoder("torchvision", torch.device(device))
    kinds = sum(KIND_BITS[k] for k in decoder.kinds)
    for lo in range(0, len(paths), batch):
        idx, exact, datas, routes = [], [], [], []
        for i, path in enumerate(paths[lo:lo + batch]):
            with open(path, "rb") as f:
                data = f.read()
            out = np.zeros((crop, crop, 3), np.uint8)
            try:
                preprocess_into(data, out, resize, interpolation, "exact")
            except DecodeError:
                continue
            idx.append(lo + i)
            exact.append(out)
            datas.append(data)
            routes.append(route(data, kinds, 1 << 62))
        if not idx:
            continue
        exact_px = np.stack(exact)
        dev = torch.from_numpy(exact_px.copy()).to(device)  # host-routed rows: exact, as the workers do
        rows = [j for j, r in enumerate(routes) if r == ROUTE_DEVICE]
        tensors = [torch.frombuffer(bytearray(datas[j]), dtype=torch.uint8) for j in rows]
        failed = decode_into(decoder, tensors, dev, rows, resize, interpolation, method)
        for j, _why in failed:  # the backend decodes these on the host in exact mode: already there
            routes[j] = -1
        yield np.array(idx), exact_px, dev.cpu().numpy(), np.array(routes)


def measure(paths, model, device: str, batch: int = 64, **kw):
    from preprocess.jpeghead import ROUTE_DEVICE

    a_top, b_top, dev_mask = [], [], []
    diff_sum = 0.0
    diff_max = 0
    diff_n = 0
    t = time.time()
    for _idx, exact, dev, routes in preprocess_pair(paths, device, batch=batch, **kw):
        a_top.append(np.argmax(model(exact), axis=1))
        b_top.append(np.argmax(model(dev), axis=1))
        on = routes == ROUTE_DEVICE
        dev_mask.append(on)
        if on.any():
            d = np.abs(exact[on].astype(np.int16) - dev[on].astype(np.int16))
            diff_sum += float(d.sum())
            diff_n += d.size
            diff_max = max(diff_max, int(d.max()))
    a, b, on = np.concatenate(a_top), np.concatenate(b_top), np.concatenate(dev_mask)
    n = len(a)
    changed = int((a != b).sum())
    return {
        "images": n,
        "device_decoded": int(on.sum()),
        "changed": changed,
        "agreement_pct": 100.0 * (n - changed) / n if n else None,
        "agreement_device_decoded_pct": 100.0 * float((a[on] == b[on]).mean()) if on.any() else None,
        "gate_pct": GATE_PCT,
        "passes": bool(n and 100.0 * (n - changed) / n >= GATE_PCT),
        "pixel_mean_abs_diff": diff_sum / diff_n if diff_n else None,
        "pixel_max_abs_diff": diff_max,
        "distinct_predictions": int(len(np.unique(a))),
        "seconds": time.time() - t,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="an image folder (default: a synthetic ImageNet-like set)")
    p.add_argument("--images", type=int, default=1000, help="images to use (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu (torchvision's CPU decoder, CI) or cuda (nvJPEG)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resize-method", choices=("pil", "tensor"), default="pil",
                   help="the device path's resize: pil (Pillow's arithmetic, --device-resize pil, the default) or "
                        "tensor (torchvision's antialiased float resize)")
    p.add_argument("--proxy", action="store_true", help="use the proxy classifier even if the pretrained one is there")
    p.add_argument("--json", metavar="PATH", help="also write the result here")
    a = p.parse_args(argv)

    from engine.pipeline.dataset import build_dataset
    from engine.report.agreement import reference_model

    if a.data:
        data = a.data
    else:
        from bench._common import bench_data

        data = bench_data(a.images, min(100, a.images), seed=13)
    ds = build_dataset(data, limit=a.images)
    paths = [ds.abspath(i) for i in range(len(ds))]
    model, description = reference_model(allow_pretrained=not a.proxy)
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    r = measure(paths, model, a.device, batch=a.batch, method=a.resize_method)
    r.update(model=description, device=a.device, data=data, resize_method=a.resize_method,
             decoder=("torchvision decode_jpeg on the CPU (libjpeg-turbo): nvJPEG itself not measured"
                      if a.device == "cpu" else "torchvision decode_jpeg on the GPU (nvJPEG)"))
    print(f"--decode device vs exact on {r['images']} images ({r['device_decoded']} decoded by the device path), "
          f"{a.device}, resize {a.resize_method}, {description}:")
    print(f"  top-1 agreement {r['agreement_pct']:.2f}% ({r['changed']} changed; gate {GATE_PCT}%: "
          f"{'pass' if r['passes'] else 'FAIL'}); pixels: mean |diff| {r['pixel_mean_abs_diff']:.3f}, "
          f"max {r['pixel_max_abs_diff']}")
    print("RESULT " + json.dumps(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0 if r["passes"] else 1


if __name__ == "__main__":
    sys.exit(main())

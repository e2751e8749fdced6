#!/usr/bin/env python3
"""Preprocessing throughput of the pool against a torchvision DataLoader as users run it.

Same images, workers and batch size, measured in one run:
  - ours: the shared-memory pool with the sim backend at 0 ms/batch (decode is all that is left);
  - DataLoader: ImageFolder + Resize/CenterCrop/ToTensor/Normalize, in a child process whose
    `PIL` is stock Pillow from PyPI, installed by this benchmark into .cache/stock-pillow;
  - the same DataLoader on this project's Pillow (Pillow-SIMD where it was built).
Prints img/s for each and the ratios; the target is ours / stock DataLoader >= 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

from _common import ROOT, bench_data, result_block, run_pool

STOCK = os.path.join(ROOT, ".cache", "stock-pillow")

DATALOADER = textwrap.dedent("""
    import sys, time, PIL, torch, torchvision
    from torchvision import transforms
    root, workers, batch, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = torchvision.datasets.ImageFolder(root, transform=tf)
    ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
    torch.set_num_threads(1)
    t = time.perf_counter()
    n = 0
    for x, y in torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers):
        n += len(y)
    print(n, time.perf_counter() - t, PIL.__version__, PIL.__file__)
""")


def ensure_stock_pillow() -> str:
    if not os.path.isdir(os.path.join(STOCK, "PIL")):
        print(f"installing stock Pillow into {STOCK} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", STOCK, "--only-binary=:all:",
                        "pillow"], check=True)
    return STOCK


def dataloader(data: str, workers: int, batch: int, limit: int, pillow_path=None):
    env = dict(os.environ)
    if pillow_path:
        env["PYTHONPATH"] = pillow_path  # stock PIL shadows the venv's
    out = subprocess.run([sys.executable, "-c", DATALOADER, data, str(workers), str(batch), str(limit)],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    n, secs, version = int(out[0]), float(out[1]), out[2]
    return n / secs, version


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2, help="best of N for each contender")
    a = p.parse_args(argv)
    data = bench_data(a.images)
    stock = ensure_stock_pillow()
    import PIL

    ours, stock_dl, own_dl = [], [], []
    for _ in range(a.repeat):  # interleaved, so drift on a noisy machine hits all three alike
        n, secs, stats, _ = run_pool(data, a.workers, a.batch_size)
        ours.append(n / secs)
        rate, stock_version = dataloader(data, a.workers, a.batch_size, a.images, stock)
        stock_dl.append(rate)
        own_dl.append(dataloader(data, a.workers, a.batch_size, a.images)[0])
    ours_r, stock_r, own_r = max(ours), max(stock_dl), max(own_dl)
    print(f"images {a.images}, workers {a.workers}, batch {a.batch_size}, best of {a.repeat}")
    print(f"  pool (ours, Pillow {PIL.__version__}, sim 0 ms)       {ours_r:8.1f} img/s")
    print(f"  DataLoader, stock Pillow {stock_version:<10}          {stock_r:8.1f} img/s")
    print(f"  DataLoader, this venv's Pillow {PIL.__version__:<10}    {own_r:8.1f} img/s")
    print(f"  ratio ours / stock DataLoader      {ours_r / stock_r:5.2f}  (target >= 2)")
    print(f"  ratio ours / DataLoader, our Pillow {ours_r / own_r:5.2f}")
    result_block("pool", images=a.images, workers=a.workers, batch=a.batch_size, ours=ours_r,
                 dataloader_stock=stock_r, dataloader_own_pillow=own_r, ratio_stock=ours_r / stock_r,
                 ratio_own=ours_r / own_r, pillow=PIL.__version__, stock_pillow=stock_version)
    return 0


if __name__ == "__main__":
    sys.exit(main())

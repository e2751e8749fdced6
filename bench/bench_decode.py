#!/usr/bin/env python3
"""Decode throughput, exact against fast, on the same images in one run, printed as ratios.

  decode only, per core (the floor of the work: bytes -> RGB pixels, nothing else), measured in as
  many processes at once as the pool has workers (one core's clock falls when all cores work)
      Pillow        Image.open(f).convert("RGB"), what the reference and exact mode decode with
      libjpeg-turbo simplejpeg.decode_jpeg (Pillow for the files it refuses), default options
      libjpeg-turbo fastdct + fastupsample (its fastest: less accurate IDCT and chroma upsampling)
  preprocessing, per core (decode + resize + crop into a buffer, likewise): exact, exact with
      Pillow's decoder (IMAGENET_ENGINE_EXACT_DECODER=pillow: exact mode before it moved to
      libjpeg-turbo, same pixels), fast, fast with
      libjpeg-turbo's fast options (off: they change 5-8 % of top-1 predictions), fast decoding whole
      images (simplejpeg, Pillow's resize: what fast mode does where the region decoder is not built),
      and fast mode's decode alone (its windows, no resize): exact over it is the ceiling of
      fast / exact, what fast mode would reach with a resize that cost nothing
  the pool, per worker: images / busy seconds of each worker (the workers' own clocks), sim
      backend at 0 ms, exact and fast
  torchvision DataLoader (ImageFolder + Resize/CenterCrop/ToTensor/Normalize, this venv's Pillow),
      same workers and batch size, img/s per worker
  --agreement: top-1 agreement of fast against exact (engine/report/agreement.py: the pretrained
      EfficientNet-Lite0 when its wheel is installed, else the proxy); --data DIR runs all of this on
      your own images instead of the synthetic set.

--repeat rounds, each: per core, every contender in turn on blocks of --block images (the order
rotating; a block is a steady state, as in a worker, and the contenders' blocks are a second or two
apart, so they share the machine's moment); then one pool run per mode (order alternating). Figures
and ratios are medians over the rounds, each ratio taken within a round, since this machine's speed
drifts by 20 % and more over minutes. The
DataLoader: the best of --repeat runs. Targets (issue 4): exact pool per worker >= 0.85 x Pillow
decode-only per core; fast pool per worker >= 1.2 x exact pool per worker and >= 0.8 x the fastest
libjpeg-turbo decode-only rate (printed against both its fast options and the accurate settings
fast mode itself uses).
"""

from __future__ import annotations

import argparse
import io
import sys
import time

from _common import bench_data, result_block, run_pool


def _files(data: str, limit: int):
    from engine.pipeline.dataset import build_dataset, build_unlabelled

    try:
        ds = build_dataset(data, limit=limit)
    except Exception:  # noqa: BLE001 -- a folder without labels: any images will do
        ds = build_unlabelled(data, limit=limit)
    return [ds.abspath(i) for i in range(len(ds))]


def _module_from(path: str, name: str):
    """A decode module loaded from a file under another name (an older decode.py, for --against)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _same_modes(dec, tag: str) -> dict:
    """The four preprocessing contenders of a decode module, named with `tag` (for --against)."""
    import numpy as np

    out = np.zeros((224, 224, 3), np.uint8)

    def run(mode, name=None, value=None):
        def fn(d):
            kept = getattr(dec, name) if name else None
            if name:
                setattr(dec, name, value)
            try:
                dec.preprocess_into(d, out, 256, "bilinear", mode)
            except dec.DecodeError:
                pass
            finally:
                if name:
                    setattr(dec, name, kept)
        return fn

    return {f"preprocess exact{tag}": run("exact"), f"preprocess exact, Pillow's decoder{tag}": run("exact", "_EXACT_TURBO", False),
            f"preprocess fast{tag}": run("fast"), f"preprocess fast, whole image{tag}": run("fast", "_REGION", None)}


def _contenders(against=None):
    import numpy as np
    import simplejpeg
    from PIL import Image

    from preprocess.decode import DecodeError, _preprocess_fast, preprocess_into

    out = np.zeros((224, 224, 3), np.uint8)

    def pillow(d):
        Image.open(io.BytesIO(d)).convert("RGB")

    def turbo(**kw):
        def run(d):
            try:
                simplejpeg.decode_jpeg(d, "RGB", **kw)
            except ValueError:  # CMYK and the like: what fast mode does with them
                Image.open(io.BytesIO(d)).convert("RGB")
        return run

    def prep(mode):
        def run(d):
            try:
                preprocess_into(d, out, 256, "bilinear", mode)
            except DecodeError:
                pass
        return run

    def fast_opts(d):
        try:
            _preprocess_fast(d, out, 256, Image.BILINEAR, None, fastdct=True, fastupsample=True)
        except DecodeError:
            pass

    def with_setting(name, value, mode):  # a mode run with one module setting of decode.py changed
        import preprocess.decode as dec

        def run(d):
            kept = getattr(dec, name)
            setattr(dec, name, value)
            try:
                preprocess_into(d, out, 256, "bilinear", mode)
            except DecodeError:
                pass
            finally:
                setattr(dec, name, kept)
        return run

    # fast mode without the region decoder: simplejpeg decodes the whole image, Pillow resizes the box
    fast_whole = with_setting("_REGION", None, "fast")
    # exact mode as the issue met it: Pillow decodes every file
    exact_pillow = with_setting("_EXACT_TURBO", False, "exact")
    contenders = {}
    import preprocess.decode as dec

    if dec._REGION is not None:
        from preprocess import jpegregion

        def decode_alone(d):
            # fast mode's one call told to stop after the decode: its window, at its DCT scale
            try:
                dec._REGION.fast_crop(d, out, 256, Image.BILINEAR, jpegregion.DECODE_ONLY, 0, -1, dec._scratch_all(),
                                      dec._scratch)
            except (jpegregion.RegionError, ValueError):
                prep("fast")(d)  # what fast mode does with the files it refuses: Pillow

        # fast mode with its resize taken out: what it decodes, nothing else. Exact mode over this is
        # the most fast / exact could reach with a resize that cost nothing.
        contenders["fast mode's decode alone (no resize)"] = decode_alone
    if against:  # the same code paths, in this module and in the older one, in turn
        contenders.update(_same_modes(dec, " (after)"))
        contenders.update(_same_modes(_module_from(against, "decode_before"), " (before)"))

    return {
        "decode Pillow": pillow,
        "decode libjpeg-turbo": turbo(),
        "decode libjpeg-turbo fastdct+fastupsample": turbo(fastdct=True, fastupsample=True),
        "preprocess exact": prep("exact"),
        "preprocess exact, Pillow's decoder": exact_pillow,
        "preprocess fast": prep("fast"),
        "preprocess fast + libjpeg-turbo fast options": fast_opts,
        "preprocess fast, whole image (no region decoder)": fast_whole,
        **contenders,
    }


_BLOBS: list = []
_FNS: dict = {}


def _load(paths, against=None):
    global _BLOBS, _FNS
    _BLOBS = []
    for p in paths:
        with open(p, "rb") as f:
            _BLOBS.append(f.read())
    _FNS = _contenders(against)


def _blocks(block: int) -> dict:
    """img/s of every contender, in blocks: each contender decodes `block` images in turn (the
    order rotating from block to block), over all the images. A block is a steady state, as in a
    worker that runs one mode (caches and allocator warm for it: measured one image at a time in
    turn, exact mode lost 5-10 % more than fast mode to the others' traffic), and the contenders'
    blocks are a second or two apart, so they share the machine's moment."""
    names = list(_FNS)
    spent = {k: 0.0 for k in names}
    for b, start in enumerate(range(0, len(_BLOBS), block)):
        chunk = _BLOBS[start:start + block]
        for name in names[b % len(names):] + names[:b % len(names)]:
            fn = _FNS[name]
            t = time.perf_counter()
            for d in chunk:
                fn(d)
            spent[name] += time.perf_counter() - t
    return {k: len(_BLOBS) / v for k, v in spent.items()}


def per_core(paths, block: int, procs: int = 1, against=None):
    """img/s per core of each contender, measured in `procs` processes at once (the pool's
    concurrency: both then see the same all-core clock and memory traffic); the mean over them."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(procs, initializer=_load, initargs=(list(paths), against)) as ex:
        runs = list(ex.map(_blocks, [block] * procs))
    return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}


def pool_per_worker(data: str, workers: int, batch: int, limit: int, mode: str):
    details: dict = {}
    n, secs, stats, _ = run_pool(data, workers, batch, limit=limit, decode=mode, details=details)
    ws = details["worker_stats"]
    busy = sum(w["busy_s"] for w in ws)
    return sum(w["images"] for w in ws) / busy, n / stats.wall_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--images", type=int, default=300, help="images per core contenders decode (default: %(default)s)")
    p.add_argument("--pool-images", type=int, default=1200,
                   help="images per pool run (default: %(default)s; runs of a second or less mostly measure "
                        "this machine's drift)")
    p.add_argument("--data", help="your own images (an ImageFolder, or any folder of images) instead")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=7,
                   help="rounds (each: the per-core contenders once per image, one pool run per mode), and "
                        "DataLoader runs (default: %(default)s)")
    p.add_argument("--block", type=int, default=50,
                   help="images each per-core contender decodes in turn (default: %(default)s)")
    p.add_argument("--no-dataloader", action="store_true", help="skip the torchvision DataLoader baseline")
    p.add_argument("--agreement", action="store_true", help="also top-1 agreement, fast against exact")
    p.add_argument("--against", metavar="PATH",
                   help="an older preprocess/decode.py (git show REV:preprocess/decode.py > PATH): its modes join "
                        "the per-core contenders beside this one's, and after / before ratios are printed")
    a = p.parse_args(argv)
    data = a.data or bench_data(max(600, a.pool_images))
    paths = _files(data, a.images)
    import PIL
    import simplejpeg

    # Rounds: each measures every per-core contender once per image, then the pool in both modes
    # (order alternating), so that each ratio compares figures taken minutes apart at most; the
    # figures and ratios printed are medians over the rounds (this machine's speed drifts by 20 %
    # and more over minutes: a ratio of figures from different moments would mostly measure that).
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    rounds, dl = [], 0.0
    for i in range(a.repeat):
        r = {"per_core": per_core(paths, a.block, a.workers, a.against)}
        for mode in ("exact", "fast") if i % 2 == 0 else ("fast", "exact"):
            r[mode] = pool_per_worker(data, a.workers, a.batch_size, a.pool_images, mode)
        rounds.append(r)
        if not a.no_dataloader:
            from bench_pool import dataloader

            dl = max(dl, dataloader(data, a.workers, a.batch_size, len(paths))[0])
    rates = {k: median([r["per_core"][k] for r in rounds]) for k in rounds[0]["per_core"]}
    pool = {m: (median([r[m][0] for r in rounds]), median([r[m][1] for r in rounds])) for m in ("exact", "fast")}

    def ratio(fn):
        return median([fn(r["per_core"], r["exact"][0], r["fast"][0]) for r in rounds])

    fastest_of = lambda pc: max(pc["decode libjpeg-turbo"], pc["decode libjpeg-turbo fastdct+fastupsample"])  # noqa: E731
    pillow = rates["decode Pillow"]
    print(f"{len(paths)} images from {data}; Pillow {PIL.__version__}, simplejpeg {simplejpeg.__version__}; "
          f"medians of {a.repeat} rounds")
    print(f"per core ({a.workers} processes at once, as many as the pool's workers):")
    for k, v in rates.items():
        print(f"  {k:52s} {v:8.1f} img/s   x{v / pillow:4.2f} of Pillow decode-only")
    print(f"pool, {a.workers} workers, batch {a.batch_size}, {a.pool_images} images, sim 0 ms (per worker = images / "
          f"busy s, workers' clocks):")
    for mode in ("exact", "fast"):
        print(f"  {mode:6s} {pool[mode][0]:8.1f} img/s per worker  ({pool[mode][1]:8.1f} img/s in all)")
    if dl:
        print(f"  torchvision DataLoader, same workers: {dl:8.1f} img/s in all, {dl / a.workers:8.1f} per worker")
    print("  fast / exact per worker, round by round: " + ", ".join(f"{r['fast'][0] / r['exact'][0]:.2f}" for r in rounds))
    ratios = {  # each the median over the rounds of the ratio within a round
        "exact_pool_per_worker / pillow_decode_only": ratio(lambda pc, ex, fa: ex / pc["decode Pillow"]),
        "fast_pool_per_worker / exact_pool_per_worker": ratio(lambda pc, ex, fa: fa / ex),
        "fast_pool_per_worker / turbo_decode_only": ratio(lambda pc, ex, fa: fa / pc["decode libjpeg-turbo"]),
        "fast_pool_per_worker / fastest_turbo_decode_only": ratio(lambda pc, ex, fa: fa / fastest_of(pc)),
        "fast_preprocess / exact_preprocess (per core)": ratio(
            lambda pc, ex, fa: pc["preprocess fast"] / pc["preprocess exact"]),
        "fast_preprocess / fastest_turbo_decode_only (per core)": ratio(
            lambda pc, ex, fa: pc["preprocess fast"] / fastest_of(pc)),
        "fast_preprocess / exact_preprocess with Pillow's decoder (per core)": ratio(
            lambda pc, ex, fa: pc["preprocess fast"] / pc["preprocess exact, Pillow's decoder"]),
    }
    if "fast mode's decode alone (no resize)" in rates:
        # the ceiling of fast / exact per core: fast mode's decode with a resize that cost nothing
        ratios["fast_decode_alone / exact_preprocess (per core): the ceiling"] = ratio(
            lambda pc, ex, fa: pc["fast mode's decode alone (no resize)"] / pc["preprocess exact"])
    if a.against:
        for k in ("preprocess exact", "preprocess exact, Pillow's decoder", "preprocess fast",
                  "preprocess fast, whole image"):
            ratios[f"{k}: after / before (per core)"] = ratio(
                lambda pc, ex, fa, k=k: pc[f"{k} (after)"] / pc[f"{k} (before)"])
    if dl:
        ratios["exact_pool / dataloader"] = pool["exact"][1] / dl
        ratios["fast_pool / dataloader"] = pool["fast"][1] / dl
    # "the fastest decode-only rate (libjpeg-turbo)": with its fast options, and with the accurate
    # IDCT and upsampling fast mode itself must use (the fast options change 5-8 % of top-1
    # predictions, docs/profiling.md "--decode fast"); both are held to the 0.8
    targets = {"exact_pool_per_worker / pillow_decode_only": 0.85, "fast_pool_per_worker / exact_pool_per_worker": 1.2,
               "fast_pool_per_worker / fastest_turbo_decode_only": 0.8, "fast_pool_per_worker / turbo_decode_only": 0.8}
    print("ratios:")
    for k, v in ratios.items():
        t = targets.get(k)
        print(f"  {k:52s} {v:5.2f}" + (f"  (target >= {t}: {'met' if v >= t else 'NOT met'})" if t else ""))
    agree = None
    if a.agreement:
        from engine.report.agreement import agreement

        agree = agreement(paths)
        print(f"top-1 agreement, fast against exact: {agree['agreement_pct']:.2f} % ({agree['changed']} of "
              f"{agree['images']} changed; {agree['distinct_predictions']} distinct classes predicted) with "
              f"{agree['model']}")
    result_block("decode", images=len(paths), pool_images=a.pool_images, data=data, workers=a.workers, batch=a.batch_size, repeat=a.repeat,
                 per_core=rates, pool_per_worker={m: v[0] for m, v in pool.items()},
                 pool_total={m: v[1] for m, v in pool.items()}, dataloader=dl, ratios=ratios,
                 agreement=agree, pillow=PIL.__version__, simplejpeg=simplejpeg.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())

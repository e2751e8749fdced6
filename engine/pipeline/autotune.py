"""`--workers auto` and `--batch-size auto`: a few seconds of measurement, then a choice with reasons.

    batch size   compute-only img/s of the backend at each candidate batch size that fits the
                 shared-memory budget (the ring: slots x batch x image bytes, at most half of the
                 free space in /dev/shm); the smallest batch within 5 % of the best rate wins
                 (latency and memory grow with the batch, throughput stops growing).
    workers      decode img/s of one worker, timed in this process (single-threaded, the run's
                 decode mode and preprocessing) on images spread over the dataset, against the
                 device's compute-only rate at the chosen batch: enough workers to cover the
                 device with 10 % headroom, at most the usable cores less one for this process
                 (event loop, copies, kernel launches; all of them below 4 cores). On the cpu backend the
                 workers take cores from the model, so the choice balances the two instead.

Each choice comes with its figures and a one-line reason, printed on stderr and kept in the
report's `autotune` section.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

from engine.procs import usable_cores
from engine.pipeline.ring import shm_free
from engine.report.profile import WORKER_HEADROOM, workers_needed

BATCH_CANDIDATES = (8, 16, 32, 64, 128, 256)
SHM_SHARE = 0.5  # of the free /dev/shm the ring may take
NEAR_BEST = 0.95


def batch_fits(batch: int, slots: int, image_bytes: int, free: Optional[int]) -> bool:
    return free is None or slots * batch * image_bytes <= SHM_SHARE * free


def measure_decode(paths: Sequence, spec, sample: int = 32, budget_s: float = 1.5) -> Dict:
    """One worker's decode rate: up to `sample` images spread over `paths` (file paths or container
    locators, preprocess/containers.py), in `spec`'s mode."""
    import numpy as np

    from preprocess.containers import ByteReader
    from preprocess.decode import DecodeError, preprocess_into

    n = len(paths)
    picks = sorted({int(i) for i in np.linspace(0, n - 1, min(sample, n))}) if n else []
    out = np.zeros(spec.shape, dtype=np.uint8)
    reader = ByteReader()
    done, spent = 0, 0.0
    for i in picks:
        t = time.perf_counter()
        try:
            data = reader.read(paths[i])
            # --decode device: the workers decode what the GPU is not given, in exact mode
            preprocess_into(data, out, spec.resize, spec.interpolation, "exact" if spec.decode == "device" else spec.decode)
        except (OSError, DecodeError):
            pass  # a bad file costs what it costs; the run will report it
        spent += time.perf_counter() - t
        done += 1
        if spent > budget_s and done >= 4:
            break
    reader.close()
    return {"images": done, "seconds": spent, "img_per_s": done / spent if spent > 0 else 0.0,
            "mode": spec.decode}


def measure_compute(backend, batch_sizes: Sequence[int], budget_s: float = 1.0,
                    prepare: bool = True) -> Dict[int, float]:
    """Compute-only img/s at each batch size (about `budget_s` per size, at least 2 calls).

    With `prepare`, a static-shape backend (compiled for one batch size) is prepared for each size
    in turn and is left prepared for the last; others once, for the largest size.
    """
    rates: Dict[int, float] = {}
    sizes = sorted(batch_sizes)
    if prepare and not backend.static_shape:
        backend.prepare(sizes[-1])
    for b in sizes:
        if prepare and backend.static_shape:
            backend.prepare(b)
        probe = backend.compute_only(b, 1, warmup=1)
        n = int(max(2, min(50, budget_s / max(probe[0], 1e-6))))
        lat = probe + backend.compute_only(b, n - 1, warmup=0)
        rates[b] = b / (sum(lat) / len(lat))
    return rates


def choose_batch(rates: Dict[int, float]) -> Tuple[int, str]:
    """The smallest batch size within 5 % of the best compute-only rate, and why."""
    best = max(rates.values())
    pick = min(b for b, r in rates.items() if r >= NEAR_BEST * best)
    table = ", ".join(f"{b}: {r:,.0f}" for b, r in sorted(rates.items()))
    return pick, (f"compute-only img/s by batch size {table}; {pick} is the smallest within "
                  f"{1 - NEAR_BEST:.0%} of the best")


def choose_workers(per_worker: float, device_rate: float, cores: int, cpu_backend: bool = False,
                   threads_measured: int = 0) -> Tuple[int, str]:
    """Workers for a device taking `device_rate` img/s when one worker decodes `per_worker` img/s."""
    if cpu_backend and cores > 1:
        # the model's rate scales with its threads (cores - workers): balance the two
        per_thread = device_rate / max(1, threads_measured or cores)
        best_w = max(range(1, cores), key=lambda w: (min(w * per_worker, (cores - w) * per_thread), -w))
        e2e = min(best_w * per_worker, (cores - best_w) * per_thread)
        return best_w, (f"cpu backend: the workers and the model share {cores} cores; one worker decodes "
                        f"{per_worker:,.0f} img/s, the model about {per_thread:,.0f} img/s per thread; {best_w} "
                        f"worker(s) and {cores - best_w} thread(s) balance at about {e2e:,.0f} img/s")
    need = workers_needed(device_rate, per_worker)
    # the parent needs a core too (event loop, copies, kernel launches): starved, it throttles the
    # device (seen on an H100 with 15 workers on 16 cores); on 2-3 cores every core decodes
    room = cores - 1 if cores >= 4 else cores
    pick = max(1, min(need, room))
    why = (f"one worker decodes {per_worker:,.0f} img/s, the device takes {device_rate:,.0f} img/s: "
           f"{need} worker(s) cover it with {WORKER_HEADROOM - 1:.0%} headroom")
    if need > room:
        why += (f"; capped at {room} of the {cores} usable cores" + (" (one left for this process)" if room < cores
                                                                    else "") + " (the run will be decode-bound)")
    return pick, why


def autotune(cfg, ds, backend, log=sys.stderr, create_backend=None):
    """Resolve `--batch-size auto` (batch_size 0) and `--workers auto` (workers 0).

    Returns (cfg with both set, backend prepared for the chosen batch size, autotune report).
    The backend may be replaced (the cpu backend sizes its threads from the worker count), made
    by `create_backend(cfg)` (the Session's: with --devices, device processes measure and run).
    """
    if create_backend is None:
        from engine.backends import create_backend

    report: Dict = {}
    cores = usable_cores()
    auto_batch, auto_workers = cfg.pipeline.batch_size == 0, cfg.pipeline.workers == 0
    image_bytes = int(math.prod(cfg.preprocess.shape))
    free = shm_free()
    prepared, rates = 0, {}
    if auto_batch:
        fits = [b for b in BATCH_CANDIDATES if batch_fits(b, cfg.pipeline.slots_for(backend.device_count), image_bytes, free)] or [BATCH_CANDIDATES[0]]
        rates = measure_compute(backend, fits)
        prepared = fits[-1]
        batch, why = choose_batch(rates)
        dropped = [b for b in BATCH_CANDIDATES if b not in fits]
        if dropped:
            why += (f"; {', '.join(map(str, dropped))} left out: the ring would take over {SHM_SHARE:.0%} of the "
                    f"{(free or 0) / 2**20:,.0f} MiB free in /dev/shm")
        report["batch_size"] = {"value": batch, "reason": why,
                                "compute_img_per_s": {str(b): r for b, r in rates.items()}}
        cfg = cfg.replace(batch_size=batch)
        print(f"--batch-size auto: {batch} ({why})", file=log)
    if prepared != cfg.pipeline.batch_size:
        backend.prepare(cfg.pipeline.batch_size)
    if auto_workers:
        dec = measure_decode([ds.locator(i) for i in range(len(ds))], cfg.preprocess)
        rate = rates.get(cfg.pipeline.batch_size) or measure_compute(backend, [cfg.pipeline.batch_size], prepare=False)[cfg.pipeline.batch_size]
        workers, why = choose_workers(dec["img_per_s"], rate, cores, cpu_backend=backend.name == "cpu",
                                      threads_measured=getattr(backend, "threads", 0))
        report["workers"] = {"value": workers, "reason": why, "decode_img_per_s_per_worker": dec["img_per_s"],
                             "decode_sample_images": dec["images"], "decode_mode": dec["mode"],
                             "device_img_per_s": rate, "cores": cores}
        cfg = cfg.replace(workers=workers)
        print(f"--workers auto: {workers} ({why})", file=log)
        if backend.name == "cpu":  # its torch threads follow the worker count: build it again
            backend.close()
            backend = create_backend(cfg)
            backend.prepare(cfg.pipeline.batch_size)
    return cfg, backend, report

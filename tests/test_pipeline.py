"""The pool + ring + scheduler: every image exactly once, pixels exact, overlap, both event loops.

The sim backend's logits are a deterministic function of the pixels (`sim_logits`), so each
image's logits can be compared with the same function applied to torchvision's preprocessing of
the same file: an image decoded wrongly, lost, duplicated or mixed up with another shows up.
"""

import asyncio
import time

import numpy as np
import pytest
from PIL import Image

from engine.backends.sim import SimBackend, sim_logits
from engine.config import resolve_config
from engine.pipeline.dataset import build_dataset
from engine.pipeline.pool import WorkerPool
from engine.pipeline.ring import Ring
from engine.pipeline.scheduler import loop_name, new_event_loop, run_pipeline
from engine.pipeline.sources import PoolSource


@pytest.fixture(scope="module")
def reference_logits(folder_set):
    """sim_logits of torchvision's Resize(256) -> CenterCrop(224) of each image, by dataset index."""
    from torchvision import transforms

    ds = build_dataset(folder_set)
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    out = []
    for i in range(len(ds)):
        with open(ds.abspath(i), "rb") as f:
            img = Image.open(f).convert("RGB")
        out.append(sim_logits(np.asarray(tf(img))[None], 1000)[0])
    return ds, np.stack(out)


def run_direct(ds, loop_kind="auto", **fields):
    """Drive pool + scheduler directly; returns ({index: (ok, logits)}, stats, loop name)."""
    cfg = resolve_config("resnext50_32x4d", backend="sim", **fields)
    backend = SimBackend(cfg)
    backend.prepare(cfg.pipeline.batch_size)
    ring = Ring(cfg.pipeline.slots, cfg.pipeline.batch_size, cfg.preprocess.shape)
    got = {}

    def reduce(r):
        for j, i in enumerate(r.indices.tolist()):
            assert i not in got, f"image {i} reduced twice"
            got[i] = (bool(r.ok[j]), r.logits[j].copy(), int(r.labels[j]))

    async def main():
        pool = WorkerPool(ring, ds, cfg.preprocess, cfg.pipeline.workers)
        await pool.start()
        try:
            return await run_pipeline(PoolSource(pool, ring), backend, len(ds), cfg.pipeline.batch_size, cfg.pipeline.inflight, reduce)
        finally:
            pool.close()

    loop = new_event_loop(loop_kind)
    try:
        stats = loop.run_until_complete(main())
        name = loop_name(loop)
    finally:
        loop.close()
        ring.close()
    return got, stats, name


@pytest.mark.parametrize("batch, workers, loop_kind", [
    (1, 1, "asyncio"),
    (7, 2, "uvloop"),
    (16, 3, "asyncio"),
    (50, 2, "uvloop"),
    (500, 1, "asyncio"),  # one short batch bigger than the set
])
def test_every_image_once_and_exact(reference_logits, batch, workers, loop_kind):
    ds, ref = reference_logits
    got, stats, name = run_direct(ds, loop_kind, batch_size=batch, workers=workers, sim_batch_ms=1.0)
    assert name == loop_kind
    assert sorted(got) == list(range(len(ds)))
    assert stats.images == len(ds)
    for i, (ok, logits, label) in got.items():
        assert ok, f"image {i} failed"
        assert label == ds.labels[i]
        np.testing.assert_array_equal(logits, ref[i], err_msg=f"image {i} ({ds.paths[i]})")


def test_slot_is_recycled_when_the_copy_is_done(folder_set):
    """With 2 slots and a slow device, batch b+2 starts filling before batch b's model finishes."""
    ds = build_dataset(folder_set, limit=40)
    got, stats, _ = run_direct(ds, batch_size=4, workers=2, ring_slots=2, inflight=3, sim_batch_ms=150.0)
    assert len(got) == 40
    by_no = {b.batch_no: b for b in stats.batches}
    early = [b for b in range(len(by_no) - 2) if by_no[b + 2].fill_submitted < by_no[b].done]
    assert early, "a slot was held until the model finished instead of until the copy finished"
    in_device = max(sum(1 for b in stats.batches if b.copied <= t < b.done) for t in
                    [x.copied for x in stats.batches])
    assert in_device >= 2, "batches were not overlapped on the device"


def test_event_loop_never_blocks(folder_set):
    """A ticker on the loop keeps ticking while batches are copied, computed and reduced."""
    ds = build_dataset(folder_set, limit=60)
    cfg = resolve_config("resnext50_32x4d", backend="sim", batch_size=8, workers=2, sim_batch_ms=40.0)
    backend = SimBackend(cfg)
    backend.prepare(8)
    ring = Ring(cfg.pipeline.slots, 8, cfg.preprocess.shape)
    gaps = []

    async def ticker(stop):
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def main():
        stop = asyncio.Event()
        pool = WorkerPool(ring, ds, cfg.preprocess, cfg.pipeline.workers)
        await pool.start()
        t = asyncio.ensure_future(ticker(stop))
        try:
            await run_pipeline(PoolSource(pool, ring), backend, len(ds), 8, 3, lambda r: None)
        finally:
            stop.set()
            await t
            pool.close()

    loop = new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        ring.close()
    assert len(gaps) > 20
    assert max(gaps) < 0.2, f"the event loop was blocked for {max(gaps) * 1000:.0f} ms"


def test_ring_layout_round_trip():
    ring = Ring(3, 5, (10, 12, 3))
    try:
        other = Ring.attach(ring.name, 3, 5, (10, 12, 3))
        other.pixels(2)[4] = 200
        other.labels[2, 4] = 77
        assert ring.pixels(2)[4].min() == 200 and ring.labels[2, 4] == 77
        assert ring.pixels(1).max() == 0 and ring.pixels(2)[3].max() == 0
        other.close()
    finally:
        ring.close()

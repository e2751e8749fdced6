"""The Session as a library user drives it (engine.Session), and its one close order."""

from __future__ import annotations

import io
import signal

import numpy as np
import pytest

import engine
from conftest import leaked_rings
from engine.evaluate import run_eval


def test_library_session_counts_like_run_eval(folder_set):
    cfg = engine.resolve_config(data=folder_set, backend="sim", batch_size=16, workers=1, sim_batch_ms=0,
                                progress=False)
    metrics = engine.Metrics(cfg.data.num_classes)
    handlers = []

    def reduce(r):
        handlers.append(signal.getsignal(signal.SIGTERM))
        metrics.update(r.logits[r.ok], r.labels[r.ok])

    before = signal.getsignal(signal.SIGTERM)
    with engine.Session(cfg) as s:
        assert s.cfg.backend.name == "sim" and s.backend is not None and s.pool is not None
        lat = s.compute_only(3)
        assert len(lat) == 3 and all(t >= 0 for t in lat)
        stats = s.run(0, len(s.dataset), reduce)
        assert stats.images == len(s.dataset) == 120
        assert s.stopped is None
    # a library Session installs no signal handlers, during the run or after it
    assert set(handlers) == {before} and signal.getsignal(signal.SIGTERM) == before
    report, status = run_eval(cfg, out=io.StringIO(), handle_signals=False)
    assert status == 0
    assert (metrics.images, metrics.correct[1], metrics.correct[5]) == \
        (report["images"], report["correct_top1"], report["correct_top5"])
    assert not leaked_rings()


def test_session_runs_ranges_and_closes_twice(folder_set):
    cfg = engine.resolve_config(data=folder_set, backend="sim", batch_size=8, workers=1, sim_batch_ms=0,
                                progress=False)
    seen = []
    s = engine.Session(cfg).open()
    try:
        s.run(0, 40, lambda r: seen.extend(r.indices.tolist()))
        s.run(80, 120, lambda r: seen.extend(r.indices.tolist()))
    finally:
        s.close()
    s.close()  # idempotent
    assert sorted(seen) == list(range(40)) + list(range(80, 120))
    assert s.describe()["backend"] == "sim"  # kept from before close
    assert not leaked_rings()


def test_a_failed_open_closes_what_it_built(folder_set):
    cfg = engine.resolve_config(data=folder_set, backend="cpu", precision="fp16", batch_size=8, workers=1,
                                progress=False)
    s = engine.Session(cfg)
    with pytest.raises(engine.RunError, match="fp16 is not supported on the cpu backend"):
        s.open()
    assert s.ring is None and not leaked_rings()


def test_errors_carry_their_exit_status():
    from engine.config import ConfigError
    from engine.pipeline.pool import PoolError
    from engine.scoring.job import OutputMismatchError

    assert ConfigError("x").exit_status == 2 and OutputMismatchError("x").exit_status == 2
    assert PoolError("x").exit_status == 3
    from engine.models.export import ExportError, TraceMismatchError

    assert ExportError("x").exit_status == 2 and TraceMismatchError("x").exit_status == 3


def test_decode_only_session_fills_the_cache(folder_set, tmp_path):
    cfg = engine.resolve_config(data=folder_set, backend="cpu", batch_size=32, workers=1, progress=False,
                                pixel_cache=str(tmp_path / "pc"))
    with engine.Session(cfg, device=False) as s:
        assert s.backend is None
        s.fill([(0, 32), (32, 64), (64, 96), (96, 120)])
        assert s.source.decoded == 120 and not np.any(s.cache.state == 0)
    assert s.pixel_cache["written"] == 120

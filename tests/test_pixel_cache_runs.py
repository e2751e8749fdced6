"""Runs with the pixel cache: exactly the counts, failures and per-image logits of a run without it.

The sim backend's logits are a function of the pixels it copied (`sim_logits`), so an image read
wrongly from the cache, lost, duplicated or mixed up with another changes its logits. The set has
failed images between good ones (truncated, empty, text, random bytes, a directory, a broken
symlink), so failures are read back from the cache with their reasons too.

The storage layer itself (format, key, torn records, SIGKILL, full disk) is tested in
tests/test_pixelcache.py; here: the sources, the commands and their reports.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, run_cli

from engine.backends.sim import SimBackend
from engine.config import resolve_config
from engine.pipeline.dataset import build_dataset
from engine.pipeline.pixelcache import MISS, CacheFull, PixelCache
from engine.pipeline.session import Session

EVAL = os.path.join(ROOT, "bin", "run-eval")
SCORE = os.path.join(ROOT, "bin", "run-score")
MAKE_CACHE = os.path.join(ROOT, "bin", "make-cache")
SIM = ["--backend", "sim", "--sim-batch-ms", "1", "--no-progress"]


@pytest.fixture(scope="module")
def mixed_set(folder_set, tmp_path_factory):
    """30 good images with failed ones between them (names sort right after a good image's)."""
    root = tmp_path_factory.mktemp("mixed_set")
    ds = build_dataset(folder_set, limit=30)
    for p in ds.paths:
        os.makedirs(root / os.path.dirname(p), exist_ok=True)
        shutil.copy(os.path.join(folder_set, p), root / p)
    good = open(os.path.join(folder_set, ds.paths[0]), "rb").read()
    cls = root / os.path.dirname(ds.paths[3])
    stem = lambda k: os.path.splitext(os.path.basename(ds.paths[k]))[0]  # noqa: E731
    (cls / f"{stem(3)}_truncated.JPEG").write_bytes(good[: len(good) // 2])
    (cls / f"{stem(8)}_empty.JPEG").write_bytes(b"")
    (cls / f"{stem(9)}_text.JPEG").write_text("this is not an image\n")
    (cls / f"{stem(17)}_random.JPEG").write_bytes(np.random.default_rng(3).bytes(5000))
    (cls / f"{stem(21)}_dir.JPEG").mkdir()
    os.symlink(str(cls / "nowhere.JPEG"), str(cls / f"{stem(25)}_link.JPEG"))
    return str(root)


BAD = 6


def drive(data, cache_dir=None, batch=8, workers=2, static=False, limit=None, write=True, put=None):
    """A Session (pool + scheduler, + the cache) on the sim backend. Returns ({index: (ok, logits,
    reason)}, the pixel cache's stats or None, the pool)."""
    ds = build_dataset(data, limit=limit)
    cfg = resolve_config("resnext50_32x4d", backend="sim", batch_size=batch, workers=workers, sim_batch_ms=0.5,
                         pixel_cache=cache_dir)
    backend = SimBackend(cfg)
    backend.prepare(batch)
    if static:
        backend.static_shape = True  # the Session pads every batch to the batch size
    got = {}

    def reduce(r):
        reasons = dict(r.failures)
        for j, i in enumerate(r.indices.tolist()):
            assert i not in got, f"image {i} reduced twice"
            got[i] = (bool(r.ok[j]), r.logits[j].copy(), reasons.get(j))

    session = Session(cfg, ds, backend=backend, cache_write=write).open()
    try:
        if session.cache is not None and put is not None:
            session.cache.put = put(session.cache)
        session.run(0, len(ds), reduce)
    finally:
        session.close()
    return got, session.pixel_cache, session.pool


def assert_same(got, ref):
    assert sorted(got) == sorted(ref)
    for i in ref:
        ok, logits, reason = got[i]
        assert ok == ref[i][0], f"image {i}: ok {ok}, uncached {ref[i][0]}"
        assert reason == ref[i][2], f"image {i}: reason {reason!r}, uncached {ref[i][2]!r}"
        if ok:
            np.testing.assert_array_equal(logits, ref[i][1], err_msg=f"image {i}")


@pytest.fixture(scope="module")
def uncached(mixed_set):
    got, _, _ = drive(mixed_set, batch=8, workers=2)
    assert sum(1 for ok, _, _ in got.values() if not ok) == BAD
    return got


@pytest.mark.parametrize("batch, workers, static", [(1, 1, False), (7, 2, False), (16, 3, True), (64, 2, True)])
def test_write_through_then_cached_equal_the_uncached_run(mixed_set, uncached, tmp_path, batch, workers, static):
    n = len(uncached)
    got, st, pool = drive(mixed_set, str(tmp_path), batch, workers, static)
    assert_same(got, uncached)
    assert (st["written"], st["written_failed"], st["hits"], st["decoded"]) == (n - BAD, BAD, 0, n)
    assert st["workers_started"]

    got, st, pool = drive(mixed_set, str(tmp_path), batch, workers, static)
    assert_same(got, uncached)
    assert (st["hits"], st["hits_failed"], st["written"], st["rejected"], st["decoded"]) == (n, BAD, 0, 0, 0)
    assert not st["workers_started"] and not pool.workers and not pool.worker_stats(), "workers were started"


def test_partial_cache_decodes_only_what_is_missing(mixed_set, uncached, tmp_path):
    """A first run on a prefix (--limit) caches it; the full run reads those, decodes the rest (batches
    mixing hits and misses: the workers decode only the missing rows) and stores them."""
    n = len(uncached)
    drive(mixed_set, str(tmp_path), batch=8, workers=1, limit=13)
    got, st, _ = drive(mixed_set, str(tmp_path), batch=5, workers=2)
    assert_same(got, uncached)
    assert st["hits"] == 13 and st["decoded"] == n - 13
    assert st["written"] + st["written_failed"] == n - 13


def test_edited_image_and_flipped_byte_are_decoded_again(mixed_set, uncached, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(mixed_set, data, symlinks=True)
    cache = str(tmp_path / "cache")
    drive(str(data), cache, batch=8)
    ds = build_dataset(str(data))
    # an edited image: the pixels of another image under its name (new size and mtime)
    edited = 4
    shutil.copy(ds.abspath(11), ds.abspath(edited))
    # a flipped byte in the stored pixels of image 14
    cfg = resolve_config("resnext50_32x4d")
    pc = PixelCache.open(cache, ds, cfg.preprocess, None, write=False)
    pixels = os.path.join(pc.dir, "pixels")
    row = int(np.prod(pc.shape))
    pc.close()
    with open(pixels, "r+b") as f:
        f.seek(14 * row + 1000)
        b = f.read(1)
        f.seek(14 * row + 1000)
        f.write(bytes([b[0] ^ 0x10]))
    got, st, _ = drive(str(data), cache, batch=8)
    ref = dict(uncached)
    ref[edited] = uncached[11]
    assert_same(got, ref)
    assert st["rejected"] == 2 and st["decoded"] == 2 and st["written"] == 2
    got, st, _ = drive(str(data), cache, batch=8)  # and they are stored again
    assert_same(got, ref)
    assert st["decoded"] == 0 and st["rejected"] == 0


def test_disk_full_mid_run_stops_writing_and_keeps_scoring(mixed_set, uncached, tmp_path, capsys):
    calls = []

    def failing_put(cache):
        real = cache.put

        def put(*a, **k):
            calls.append(1)
            if len(calls) > 1:
                raise CacheFull("pixel cache: the disk is full (test)")
            return real(*a, **k)
        return put

    got, st, _ = drive(mixed_set, str(tmp_path), batch=4, put=failing_put)
    assert_same(got, uncached)
    assert not st["writing"] and "disk is full" in st["write_error"]
    assert capsys.readouterr().err.count("stopped writing") == 1
    assert len(calls) == 2, "writes went on after the disk was full"
    got, st, _ = drive(mixed_set, str(tmp_path), batch=4)  # resumable: the first batch is there
    assert_same(got, uncached)
    assert st["hits"] == 4


def test_sim_copy_reads_every_byte():
    cfg = resolve_config("resnext50_32x4d", backend="sim", batch_size=4, sim_batch_ms=0.0)
    be = SimBackend(cfg)
    be.prepare(4)
    x = np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    want = be.submit(x.copy()).result()
    job = be.submit(x)
    job.copied()
    x[:] = 0  # the host batch is reused once copied: the device has its own copy
    np.testing.assert_array_equal(job.result(), want)
    assert be.copied_bytes == 2 * x.nbytes


# -- commands --------------------------------------------------------------------------------------

def _report(path):
    with open(path) as f:
        return json.load(f)


def _same_report(a, b):
    for k in ("images", "failed", "correct_top1", "correct_top5"):
        assert a[k] == b[k], k
    key = lambda f: f["index"]  # noqa: E731  (batches finish in any order, cached or not)
    assert sorted(a["failures"], key=key) == sorted(b["failures"], key=key)


def test_run_eval_cli_reports_the_cache(mixed_set, tmp_path):
    cache = str(tmp_path / "pc")
    runs = []
    for k, extra in enumerate(([], ["--pixel-cache", cache], ["--pixel-cache", cache])):
        out = str(tmp_path / f"r{k}.json")
        r = run_cli([EVAL, "--data", mixed_set, "--batch-size", "8", "--workers", "2", "--json", out] + SIM + extra)
        assert r.returncode == 1, r.stderr  # failed images
        runs.append((_report(out), r.stdout))
    (plain, _), (first, text1), (second, text2) = runs
    _same_report(first, plain)
    _same_report(second, plain)
    assert "pixel_cache" not in plain and plain["config"]["pipeline"]["pixel_cache"] is None
    n = plain["dataset_images"]
    pc1, pc2 = first["pixel_cache"], second["pixel_cache"]
    assert pc1["dir"].startswith(cache) and pc1["dir"] == pc2["dir"]
    assert (pc1["hits"], pc1["written"], pc1["rejected"]) == (0, n - BAD, 0)
    assert (pc2["hits"], pc2["hits_failed"], pc2["written"], pc2["rejected"]) == (n, BAD, 0, 0)
    assert second["stages"]["workers"] == [] and not pc2["workers_started"]
    assert first["config"]["pipeline"]["pixel_cache"] == cache
    assert "pixel cache" in text2 and f"{n} read" in text2 and "no workers started" in text2
    assert second["profile"]["pixel_cache"] == {"hits": n, "decoded": 0}
    assert "workers could deliver 0" not in text2  # the verdict names the cache, not idle workers


def test_verdict_of_a_cache_fed_run():
    from engine.report.profile import with_pixel_cache

    def prof(bound):
        return {"bound": bound, "verdict": "copy-bound: ... the workers could deliver 0", "end_to_end": 900.0,
                "ratio": 0.45, "stages_share": {"copy": 0.5}}

    p = with_pixel_cache(prof("copy"), {"hits": 100, "decoded": 0})
    assert p["bound"] == "copy" and "fed by the pixel cache (all 100 images read, none decoded)" in p["verdict"]
    assert with_pixel_cache(prof("device"), {"hits": 100, "decoded": 0})["verdict"].startswith("copy-bound: ...")
    assert with_pixel_cache(prof("copy"), {"hits": 60, "decoded": 40})["verdict"].startswith("copy-bound: ...")
    assert with_pixel_cache(prof("copy"), None)["verdict"].startswith("copy-bound: ...")


def test_default_pixel_cache_folder(mixed_set, tmp_path):
    out = str(tmp_path / "r.json")
    env = {"IMAGENET_ENGINE_CACHE": str(tmp_path / "engine-cache")}
    r = run_cli([EVAL, "--data", mixed_set, "--batch-size", "8", "--json", out, "--pixel-cache"] + SIM, env=env)
    assert r.returncode == 1, r.stderr
    assert _report(out)["pixel_cache"]["dir"].startswith(str(tmp_path / "engine-cache" / "pixels"))


@pytest.mark.parametrize("script", ["run-eval", "run-score", "run-bench", "make-cache"])
def test_abbreviations_are_refused(script, tmp_path):
    """`--cache DIR` used to be taken as `--cache-dir DIR`; now it is an error."""
    from engine.bench import bench_parser
    from engine.cli import eval_parser
    from engine.make_cache import cache_parser
    from engine.scoring.run import score_parser

    parser = {"run-eval": eval_parser, "run-score": score_parser, "run-bench": bench_parser,
              "make-cache": cache_parser}[script]()
    args = ["--data", str(tmp_path), "--out", str(tmp_path / "o")] if script == "run-score" else ["--data", "x"]
    if script == "run-bench":
        args = []
    with pytest.raises(SystemExit) as e:
        parser.parse_args(args + ["--cache", str(tmp_path)])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        parser.parse_args(args + ["--pixel", str(tmp_path)])


def test_run_score_with_the_cache(mixed_set, tmp_path):
    cache = str(tmp_path / "pc")
    outs = []
    for k in range(3):
        out = str(tmp_path / f"out{k}")
        extra = [] if k == 0 else ["--pixel-cache", cache]
        r = run_cli([SCORE, "--data", mixed_set, "--out", out, "--format", "jsonl", "--batch-size", "8",
                     "--part-size", "16", "--json", out + ".json"] + SIM + extra)
        assert r.returncode == 1, r.stderr
        rows = []
        for name in sorted(os.listdir(out)):
            if name.endswith(".jsonl"):
                with open(os.path.join(out, name)) as f:
                    rows += [json.loads(line) for line in f]
        outs.append((rows, _report(out + ".json")))
    (plain, _), (first, s1), (second, s2) = outs
    n = len(plain)
    assert first == plain and second == plain
    assert s1["pixel_cache"]["written"] + s1["pixel_cache"]["written_failed"] == n
    assert s2["pixel_cache"]["hits"] == n
    assert not s2["pixel_cache"]["workers_started"]


def test_make_cache_then_run_eval_reads_everything_and_export_bin(mixed_set, tmp_path):
    cache, bins, floats = str(tmp_path / "pc"), str(tmp_path / "bins"), str(tmp_path / "f32")
    r = run_cli([MAKE_CACHE, "--data", mixed_set, "--pixel-cache", cache, "--workers", "2", "--batch-size", "8",
                 "--export-bin", bins])
    assert r.returncode == 0, r.stderr
    n = len(build_dataset(mixed_set))
    assert f"{n - BAD:,} decoded and stored now" in r.stdout and "cached" in r.stderr  # progress on stderr
    again = run_cli([MAKE_CACHE, "--data", mixed_set, "--pixel-cache", cache, "--export-bin", floats,
                     "--export-format", "float32-nchw"])
    assert again.returncode == 0, again.stderr
    assert f"{n:,}: {n:,} were cached, 0 decoded" in again.stdout  # resumed: nothing to do
    out = str(tmp_path / "r.json")
    r = run_cli([EVAL, "--data", mixed_set, "--batch-size", "8", "--json", out, "--pixel-cache", cache] + SIM)
    rep = _report(out)
    assert rep["pixel_cache"]["hits"] == n and rep["pixel_cache"]["decoded"] == 0, r.stderr
    names = sorted(x for x in os.listdir(bins) if x.endswith(".bin"))
    assert len(names) == n - BAD
    assert all(os.path.getsize(os.path.join(bins, x)) == 224 * 224 * 3 for x in names)
    assert all(os.path.getsize(os.path.join(floats, x)) == 4 * 224 * 224 * 3 for x in names)
    u8 = np.fromfile(os.path.join(bins, names[0]), np.uint8).reshape(224, 224, 3)
    f32 = np.fromfile(os.path.join(floats, names[0]), np.float32).reshape(3, 224, 224)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    want = (u8.transpose(2, 0, 1).astype(np.float32) / 255 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(f32, want, rtol=0, atol=1e-6)
    with open(os.path.join(bins, "images.tsv")) as f:
        assert len([line for line in f if not line.startswith("#")]) == n - BAD


def test_two_concurrent_runs_on_one_cache(mixed_set, tmp_path):
    """One takes the write lock and writes; the other reads what is complete and decodes the rest
    without writing. Both are exact."""
    cache = str(tmp_path / "pc")
    plain = str(tmp_path / "plain.json")
    r = run_cli([EVAL, "--data", mixed_set, "--batch-size", "4", "--json", plain] + SIM)
    assert r.returncode == 1, r.stderr
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = []
    for k in range(2):
        out = str(tmp_path / f"c{k}.json")
        cmd = [sys.executable, EVAL, "--data", mixed_set, "--batch-size", "4", "--workers", "1", "--json", out,
               "--pixel-cache", cache, "--backend", "sim", "--sim-batch-ms", "20", "--no-progress"]
        procs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                       cwd=ROOT), out))
    reports = []
    for p, out in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 1, stderr
        reports.append((_report(out), stderr))
    n = len(build_dataset(mixed_set))
    for rep, _ in reports:
        _same_report(rep, _report(plain))
    written = [rep["pixel_cache"]["written"] + rep["pixel_cache"]["written_failed"] for rep, _ in reports]
    assert sum(written) == n, written  # one wrote everything; the other read or decoded without writing
    readers = [(rep, err) for rep, err in reports if not rep["pixel_cache"]["writable"]]
    for rep, err in readers:
        assert rep["pixel_cache"]["written"] == 0 and "another run is writing it" in err


def test_run_bench_e2e_builds_then_reads_the_cache(mixed_set, tmp_path):
    from engine.bench import run_bench_main

    js = str(tmp_path / "b.json")
    status = run_bench_main(["--backend", "sim", "--sim-batch-ms", "1", "--batch-sizes", "4,8", "--iterations", "2",
                             "--warmup", "0", "--e2e", mixed_set, "--workers", "2", "--json", js,
                             "--pixel-cache", str(tmp_path / "pc")])
    assert status == 0
    rows = _report(js)["results"]
    n = len(build_dataset(mixed_set))
    assert rows[0]["pixel_cache"]["written"] == n - BAD and rows[0]["pixel_cache"]["hits"] == 0
    assert rows[1]["pixel_cache"]["hits"] == n and rows[1]["pixel_cache"]["decoded"] == 0


def test_workers_start_only_when_a_checksum_fails(mixed_set, uncached, tmp_path):
    """Everything cached: no workers at the start; a row found bad when its batch is read makes the
    source start them then, and only that row is decoded (into a slot with the batch's hit rows)."""
    cache = str(tmp_path / "pc")
    drive(mixed_set, cache, batch=8)
    ds = build_dataset(mixed_set)
    pc = PixelCache.open(cache, ds, resolve_config("resnext50_32x4d").preprocess, None, write=False)
    path, row = os.path.join(pc.dir, "pixels"), int(np.prod(pc.shape))
    assert not (pc.state == MISS).any()
    pc.close()
    with open(path, "r+b") as f:
        f.seek(27 * row + 5)
        b = f.read(1)
        f.seek(27 * row + 5)
        f.write(bytes([b[0] ^ 1]))
    got, st, pool = drive(mixed_set, cache, batch=8)
    assert_same(got, uncached)
    assert st["workers_started"] and (st["rejected"], st["decoded"], st["written"]) == (1, 1, 1)
    assert sum(w["images"] for w in pool.worker_stats()) == 1


def test_cache_verify_and_other_preprocessing(mixed_set, tmp_path):
    """--cache-verify entries are read back by a verifying run; another crop gets another folder."""
    cache = str(tmp_path / "pc")
    base = [EVAL, "--data", mixed_set, "--batch-size", "8", "--pixel-cache", cache] + SIM
    reps = []
    for k, extra in enumerate((["--cache-verify"], ["--cache-verify"], ["--resize", "240", "--crop", "200"])):
        out = str(tmp_path / f"v{k}.json")
        r = run_cli(base + extra + ["--json", out])
        assert r.returncode == 1, r.stderr
        reps.append(_report(out))
    n = reps[0]["dataset_images"]
    assert reps[0]["pixel_cache"]["verify"] and reps[0]["config"]["pipeline"]["cache_verify"]
    assert reps[0]["pixel_cache"]["written"] == n - BAD and reps[1]["pixel_cache"]["hits"] == n
    _same_report(reps[1], reps[0])
    other = reps[2]["pixel_cache"]
    assert other["dir"] != reps[0]["pixel_cache"]["dir"] and "200x200" in other["dir"]
    assert other["hits"] == 0 and other["written"] == n - BAD


def test_disk_full_at_the_last_flush_is_a_warning(mixed_set, uncached, tmp_path, capsys, monkeypatch):
    def full(self):
        self.writable = False  # as PixelCache does on ENOSPC: read-only from then on
        raise CacheFull("pixel cache: the disk is full (test, at flush)")

    monkeypatch.setattr(PixelCache, "flush", full)
    got, st, _ = drive(mixed_set, str(tmp_path), batch=64)  # one batch: no flush until finish()
    assert_same(got, uncached)
    assert "at flush" in st["write_error"]
    assert capsys.readouterr().err.count("stopped writing") == 1


def test_make_cache_stopped_by_sigterm_keeps_what_it_stored_and_resumes(mixed_set, tmp_path):
    """SIGTERM while a worker hangs in a decode: status 143, a STOPPED summary, no workers or
    shared memory left; the next make-cache decodes only what the first did not store."""
    import glob
    import signal
    import subprocess
    import sys

    ds = build_dataset(mixed_set)
    cache, faults = str(tmp_path / "pc"), tmp_path / "faults"
    faults.mkdir()
    env = dict(os.environ, IMAGENET_ENGINE_FAULT=f"sleep-once:{ds.paths[-1]}",
               IMAGENET_ENGINE_FAULT_DIR=str(faults),
               PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    p = subprocess.Popen([sys.executable, MAKE_CACHE, "--data", mixed_set, "--pixel-cache", cache, "--workers", "1",
                          "--batch-size", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not any(os.path.getsize(f) for f in glob.glob(str(faults / "*"))):  # the worker is hung now
            assert p.poll() is None and time.monotonic() < deadline, "make-cache ended before the fault"
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    assert out.startswith("STOPPED make-cache"), out
    again = run_cli([MAKE_CACHE, "--data", mixed_set, "--pixel-cache", cache, "--workers", "1", "--batch-size", "4"])
    assert again.returncode == 0, again.stderr
    stored = int(again.stdout.split(" were cached, ")[0].split()[-1].replace(",", ""))
    assert 0 < stored < len(ds), again.stdout  # resumed: the first run's rows were kept


def test_make_cache_takes_the_preset_and_its_overrides():
    """make-cache resolves --preset like run-eval, so the cache it fills is the one run-eval --preset reads."""
    from engine.cli import config_from_args, config_from_args_for_cache, eval_parser
    from engine.make_cache import cache_parser

    args = ["--data", "d", "--preset", "modelzoo-acc-eval", "--crop", "200"]
    cached = config_from_args_for_cache(cache_parser().parse_args(args)).preprocess
    evaluated = config_from_args(eval_parser().parse_args(args + ["--backend", "cpu"])).preprocess
    assert cached == evaluated
    assert cached.resize == (256, 256) and cached.interpolation == "bicubic" and cached.crop == 200

"""The pixel cache on its own (engine/pipeline/pixelcache.py): keys, integrity, concurrency, disk.

The images are small files whose bytes the cache never decodes: it keys on their path, size,
mtime and label, and stores whatever pixels it is given. Pixels encode the row's dataset index,
so a row read back from the wrong place shows.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from engine.config import PreprocessSpec
from engine.pipeline import pixelcache as pc
from engine.pipeline.dataset import build_dataset
from engine.pipeline.ring import FAILED, OK

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = PreprocessSpec(resize=10, crop=8)


def make_files(root, n=24, classes=3):
    """n small 'images' in class folders a, b, c...; returns the Dataset."""
    for i in range(n):
        d = os.path.join(root, "abcdefgh"[i % classes])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"img_{i:04d}.jpg"), "wb") as f:
            f.write(b"image %d " % i * (1 + i % 5))
    return build_dataset(root)


def pixels_of(ds, lo, hi, shape=SPEC.shape):
    """Pixels that encode each row's dataset index and label."""
    out = np.zeros((hi - lo,) + tuple(shape), np.uint8)
    for k, i in enumerate(range(lo, hi)):
        rng = np.random.default_rng(i)
        out[k] = rng.integers(0, 256, shape, dtype=np.uint8)
        out[k, 0, 0, :] = (i % 256, i // 256, int(ds.labels[i]) % 256)
    return out


def fill(cache, ds, lo, hi, failed=(), reasons=None):
    status = np.full(hi - lo, OK, np.int8)
    why = {}
    for i in failed:
        if lo <= i < hi:
            status[i - lo] = FAILED
            why[i - lo] = (reasons or {}).get(i, f"cannot identify image file {ds.paths[i]!r}")
    cache.put(lo, pixels_of(ds, lo, hi, cache.shape), status, why)


@pytest.fixture
def data(tmp_path):
    return make_files(str(tmp_path / "data"))


@pytest.fixture
def croot(tmp_path):
    return str(tmp_path / "cache")


def build_full(croot, ds, failed=(), reasons=None, spec=SPEC, **kw):
    c = pc.PixelCache.open(croot, ds, spec, None, **kw)
    assert c.writable, c.note
    fill(c, ds, 0, len(ds), failed, reasons)
    c.close()
    return c.dir


def test_round_trip(data, croot):
    ds = data
    c = pc.PixelCache.open(croot, ds, SPEC, None)
    assert c.writable and c.shape == (8, 8, 3) and len(c.state) == len(ds)
    assert (c.state == pc.MISS).all()
    reasons = {3: "broken symlink", 7: "décodeur: caf\u00e9 \udcff bytes\n  two lines  "}
    fill(c, ds, 0, 10, failed=(3, 7), reasons=reasons)
    fill(c, ds, 10, len(ds))
    c.flush()
    st = c.stats()
    assert st["written"] == len(ds) - 2 and st["written_failed"] == 2 and st["hits"] == 0
    c.close()
    assert os.path.isfile(os.path.join(c.dir, "key.json"))
    assert os.path.isfile(os.path.join(c.dir, "complete.json"))

    c = pc.PixelCache.open(croot, ds, SPEC, None, write=False)
    assert not c.writable
    assert c.state[3] == c.state[7] == pc.HIT_FAILED
    assert (np.delete(c.state, [3, 7]) == pc.HIT_OK).all()
    assert c.reason(3) == reasons[3] and c.reason(7) == reasons[7]
    c.prefetch(0, len(ds))
    assert not c.check(0, len(ds)).any()
    got = c.rows(0, len(ds))
    want = pixels_of(ds, 0, len(ds))
    ok = c.state == pc.HIT_OK
    assert np.array_equal(got[ok], want[ok])
    assert got.base is not None  # a view of the mapping, no copy
    st = c.stats()
    assert st["hits"] == len(ds) and st["rejected"] == 0 and st["written"] == 0
    c.close()


def test_prefix_and_growth(tmp_path, croot):
    full = make_files(str(tmp_path / "data"), n=30)
    part = build_dataset(str(tmp_path / "data"), limit=10)
    # a short run first, then the full one: the file grows, the prefix still hits
    c = pc.PixelCache.open(croot, part, SPEC, None)
    fill(c, part, 0, 10)
    c.close()
    c = pc.PixelCache.open(croot, full, SPEC, None)
    assert (c.state[:10] == pc.HIT_OK).all() and (c.state[10:] == pc.MISS).all()
    assert not c.check(0, 10).any()
    fill(c, full, 10, 30)
    c.close()
    # then a short run again: the same folder, all hits
    c = pc.PixelCache.open(croot, build_dataset(str(tmp_path / "data"), limit=7), SPEC, None, write=False)
    assert (c.state == pc.HIT_OK).all() and not c.check(0, 7).any()
    assert np.array_equal(c.rows(0, 7), pixels_of(full, 0, 7))
    c.close()


def test_edited_image_is_a_miss(data, croot):
    ds = data
    build_full(croot, ds)
    st = os.stat(ds.abspath(4))
    with open(ds.abspath(4), "ab") as f:  # other size
        f.write(b"more")
    os.utime(ds.abspath(5), ns=(st.st_atime_ns, st.st_mtime_ns + 1000))  # other mtime
    os.chmod(ds.abspath(6), 0o600)  # other mode (an unreadable file's cached failure would be stale)
    c = pc.PixelCache.open(croot, ds, SPEC, None)
    assert list(np.nonzero(c.state == pc.MISS)[0]) == [4, 5, 6]
    assert c.stats()["rejected"] == 3
    fill(c, ds, 4, 7)
    c.close()
    c = pc.PixelCache.open(croot, ds, SPEC, None)
    assert (c.state == pc.HIT_OK).all()
    c.close()


def test_other_label_is_a_miss(tmp_path, croot):
    root = str(tmp_path / "flat")
    os.makedirs(root)
    for i in range(6):
        with open(os.path.join(root, f"x{i}.jpg"), "wb") as f:
            f.write(b"x" * (i + 1))
    lab = str(tmp_path / "labels.txt")
    with open(lab, "w") as f:
        f.write("".join(f"x{i}.jpg {i % 3}\n" for i in range(6)))
    ds = build_dataset(root, labels=lab)
    build_full(croot, ds)
    with open(lab, "w") as f:
        f.write("".join(f"x{i}.jpg {(i % 3) if i != 2 else 9}\n" for i in range(6)))
    c = pc.PixelCache.open(croot, build_dataset(root, labels=lab), SPEC, None)
    assert list(np.nonzero(c.state == pc.MISS)[0]) == [2]
    c.close()


def test_verify_catches_same_size_same_mtime(data, croot):
    ds = data
    build_full(croot, ds, verify=True)
    path = ds.abspath(2)
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(b"X")  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    c = pc.PixelCache.open(croot, ds, SPEC, None, write=False)
    assert (c.state == pc.HIT_OK).all()  # size and mtime alone cannot see it
    c.close()
    c = pc.PixelCache.open(croot, ds, SPEC, None, verify=True)
    assert list(np.nonzero(c.state == pc.MISS)[0]) == [2]
    fill(c, ds, 2, 3)
    c.close()
    # entries made without --verify have no content hash: verify does not trust them
    c = pc.PixelCache.open(croot, ds, SPEC, None, verify=True)
    assert (c.state == pc.HIT_OK).all()
    c.close()


def test_verify_needs_content_hashes(data, croot):
    build_full(croot, data)
    c = pc.PixelCache.open(croot, data, SPEC, None, verify=True, write=False)
    assert (c.state == pc.MISS).all()
    c.close()


def test_other_preprocessing_other_folder(data, croot):
    d1 = build_full(croot, data)
    others = [
        (PreprocessSpec(resize=10, crop=6), None),
        (PreprocessSpec(resize=12, crop=8), None),
        (PreprocessSpec(resize=10, crop=8, interpolation="bicubic"), None),
        (PreprocessSpec(resize=10, crop=8, decode="fast"), None),
        (SPEC, 1 << 20),
    ]
    dirs = {d1}
    for spec, limit in others:
        c = pc.PixelCache.open(croot, data, spec, limit, write=False)
        assert (c.state == pc.MISS).all()
        dirs.add(c.dir)
        c.close()
    assert len(dirs) == len(others) + 1
    # mean and std are applied after the cache: the same folder
    c = pc.PixelCache.open(croot, data, PreprocessSpec(resize=10, crop=8, mean=(0.5,) * 3), None, write=False)
    assert c.dir == d1 and (c.state == pc.HIT_OK).all()
    c.close()


def test_key_names_the_decoders(data, croot):
    key = pc.pixel_key(SPEC, None, data.root)
    dec = key["decoders"]
    for name in ("pillow", "pillow_flavour", "pillow_core_sha256", "pillow_libjpeg_turbo", "decoder",
                 "region_decoder"):
        assert name in dec
    assert key["pixel_path_version"] == pc.PIXEL_PATH_VERSION
    d = build_full(croot, data)
    import json

    with open(os.path.join(d, "key.json")) as f:
        assert json.load(f) == key


def test_other_pixel_path_version(data, croot, monkeypatch):
    d1 = build_full(croot, data)
    monkeypatch.setattr(pc.key, "PIXEL_PATH_VERSION", pc.PIXEL_PATH_VERSION + 1)  # where pixel_key reads it
    c = pc.PixelCache.open(croot, data, SPEC, None, write=False)
    assert c.dir != d1 and (c.state == pc.MISS).all()
    c.close()


def test_garbage_key_file(data, croot):
    d = build_full(croot, data)
    with open(os.path.join(d, "key.json"), "w") as f:
        f.write('{"not": "the key"}')
    c = pc.PixelCache.open(croot, data, SPEC, None, write=False)
    assert (c.state == pc.MISS).all()
    c.close()
    c = pc.PixelCache.open(croot, data, SPEC, None)  # the writer starts the folder again
    assert (c.state == pc.MISS).all()
    fill(c, data, 0, len(data))
    c.close()
    c = pc.PixelCache.open(croot, data, SPEC, None, write=False)
    assert (c.state == pc.HIT_OK).all()
    c.close()


def test_flipped_byte_is_rejected(data, croot):
    d = build_full(croot, data)
    rb = int(np.prod(SPEC.shape))
    with open(os.path.join(d, "pixels"), "r+b") as f:
        f.seek(5 * rb + 77)
        b = f.read(1)
        f.seek(5 * rb + 77)
        f.write(bytes([b[0] ^ 0x10]))
    c = pc.PixelCache.open(croot, data, SPEC, None)
    assert (c.state == pc.HIT_OK).all()  # pixels are checked when read
    bad = c.check(0, 8)
    assert list(np.nonzero(bad)[0]) == [5]
    assert c.state[5] == pc.MISS
    st = c.stats()
    assert st["rejected"] == 1 and st["hits"] == 7
    fill(c, data, 5, 6)  # re-decoded and stored again
    c.close()
    c = pc.PixelCache.open(croot, data, SPEC, None, write=False)
    assert not c.check(0, len(data)).any()
    assert np.array_equal(c.rows(5, 6), pixels_of(data, 5, 6))
    c.close()


def test_checksum_sees_small_changes():
    rng = np.random.default_rng(1)
    for shape in ((224, 224, 3), (8, 8, 3), (5, 5, 3), (299, 299, 3)):
        rows = rng.integers(0, 256, (3,) + shape, dtype=np.uint8)
        base = pc.checksums(rows)
        assert base.dtype == np.uint64 and len(set(base.tolist())) == 3
        flat = rows.reshape(3, -1)
        for pos in (0, 1, flat.shape[1] // 2, flat.shape[1] - 1):
            x = flat.copy()
            x[1, pos] ^= 1
            assert pc.checksums(x)[1] != base[1], (shape, pos)
            assert pc.checksums(x)[0] == base[0]
        if flat.shape[1] >= 3 * 4096:  # two 4 KiB blocks swapped
            x = flat.copy()
            x[1, :4096], x[1, 4096:8192] = flat[1, 4096:8192], flat[1, :4096]
            assert pc.checksums(x)[1] != base[1]
        assert np.array_equal(pc.checksums(rows[1:2]), base[1:2])


def test_truncated_pixels_file(data, croot):
    d = build_full(croot, data)
    rb = int(np.prod(SPEC.shape))
    os.truncate(os.path.join(d, "pixels"), 10 * rb + 100)
    c = pc.PixelCache.open(croot, data, SPEC, None, write=False)
    assert (c.state[:10] == pc.HIT_OK).all() and (c.state[10:] == pc.MISS).all()
    assert c.stats()["rejected"] == len(data) - 10
    assert not c.check(0, 10).any()
    c.close()
    # truncated then grown back (zeros): the writer sees the rows as missing, and a reader that
    # comes after a writer that died before rewriting them sees bad checksums, never garbage
    c = pc.PixelCache.open(croot, data, SPEC, None)
    assert (c.state[10:] == pc.MISS).all()
    c._drop_writer()
    c.close()
    assert os.path.getsize(os.path.join(d, "pixels")) == len(data) * rb
    c = pc.PixelCache.open(croot, data, SPEC, None, write=False)
    assert (c.state[:10] == pc.HIT_OK).all() and (c.state[10:] == pc.MISS).all()
    assert not c.check(0, len(data)).any()
    c.close()
    # regrown behind the cache's back: the records still say OK, the checksums say otherwise
    build_full(croot, data)
    os.truncate(os.path.join(d, "pixels"), 10 * rb + 100)
    os.truncate(os.path.join(d, "pixels"), len(data) * rb)
    c = pc.PixelCache.open(croot, data, SPEC, None, write=False)
    bad = c.check(0, len(data))
    assert list(np.nonzero(bad)[0]) == list(range(10, len(data)))
    assert (c.state[10:] == pc.MISS).all() and c.stats()["rejected"] == len(data) - 10
    c.close()
    c = pc.PixelCache.open(croot, data, SPEC, None)
    assert (c.state == pc.HIT_OK).all()
    assert c.check(0, len(data))[10:].all()  # a run checks each batch, then decodes and stores the bad rows
    fill(c, data, 10, len(data))
    c.close()
    c = pc.PixelCache.open(croot, data, SPEC, None, write=False)
    assert (c.state == pc.HIT_OK).all() and not c.check(0, len(data)).any()
    c.close()


@pytest.mark.parametrize("damage", ["garbage", "torn", "zeros", "truncated"])
def test_bad_records_read_as_missing(data, croot, damage):
    d = build_full(croot, data, failed=(9,))
    size = pc.RECORD.itemsize
    path = os.path.join(d, "records")
    with open(path, "r+b") as f:
        if damage == "garbage":
            f.seek(4 * size)
            f.write(os.urandom(size))
        elif damage == "torn":  # the first half of another row's record over record 4
            f.seek(5 * size)
            other = bytearray(f.read(size))
            f.seek(4 * size)
            f.write(bytes(other[:size // 2]))
        elif damage == "zeros":
            f.seek(4 * size)
            f.write(bytes(size))
    if damage == "truncated":
        os.truncate(path, 4 * size + 17)
    c = pc.PixelCache.open(croot, data, SPEC, None, write=False)
    miss = np.nonzero(c.state == pc.MISS)[0]
    if damage == "truncated":
        assert list(miss) == list(range(4, len(data)))
    else:
        assert list(miss) == [4]
        assert c.state[9] == pc.HIT_FAILED
    assert not c.check(0, len(data)).any()
    c.close()


def test_bad_reason_reads_as_missing(data, croot):
    d = build_full(croot, data, failed=(2, 9))
    with open(os.path.join(d, "reasons"), "r+b") as f:
        f.write(b"#")
    c = pc.PixelCache.open(croot, data, SPEC, None, write=False)
    assert c.state[2] == pc.MISS and c.state[9] == pc.HIT_FAILED
    c.close()


WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from engine.pipeline import pixelcache as pc
    from engine.pipeline.dataset import build_dataset
    from engine.pipeline.ring import OK
    from test_pixelcache import SPEC, pixels_of
    ds = build_dataset({data!r})
    c = pc.PixelCache.open({croot!r}, ds, SPEC, None)
    assert c.writable
    print("open", flush=True)
    lo = 0
    while True:  # write forever, flushing now and then, until killed
        n = 3
        c.put(lo, pixels_of(ds, lo, lo + n), np.full(n, OK, np.int8), {{}})
        if lo % 9 == 0:
            c.flush()
        lo = (lo + n) % (len(ds) - n)
        if lo < n:
            c.state[:] = pc.MISS  # again from the start: rewrites rows that have records
""")


def test_sigkill_while_writing(tmp_path, croot):
    ds = make_files(str(tmp_path / "data"), n=60)
    script = WRITER.format(root=ROOT, tests=os.path.join(ROOT, "tests"), data=ds.root, croot=croot)
    for delay in (0.3, 0.7, 1.2):
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert p.stdout.readline().strip() == b"open", p.stderr.read().decode()
            time.sleep(delay)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
        c = pc.PixelCache.open(croot, ds, SPEC, None)  # the lock died with it
        assert c.writable
        hits = np.nonzero(c.state == pc.HIT_OK)[0]
        assert not c.check(0, len(ds)).any()
        assert np.array_equal(c.rows(0, len(ds))[hits], pixels_of(ds, 0, len(ds))[hits])
        assert not (c.state == pc.HIT_FAILED).any()
        c._drop_writer()
        c.close()
    assert len(hits) > 0


def test_two_runs_one_writer(data, croot):
    a = pc.PixelCache.open(croot, data, SPEC, None)
    b = pc.PixelCache.open(croot, data, SPEC, None)
    assert a.writable and not b.writable
    assert "another run is writing" in b.note
    fill(a, data, 0, 10)
    b.put(0, pixels_of(data, 0, 5), np.full(5, OK, np.int8), {})  # read-only: ignored
    a.flush()
    c = pc.PixelCache.open(croot, data, SPEC, None)
    assert not c.writable
    assert (c.state[:10] == pc.HIT_OK).all() and (c.state[10:] == pc.MISS).all()
    assert not c.check(0, 10).any()
    assert np.array_equal(c.rows(0, 10), pixels_of(data, 0, 10))
    c.close()
    # a reader opened before the flush picks the entries up with refresh()
    fill(a, data, 10, 14)
    assert (b.state[10:14] == pc.MISS).all()
    assert b.refresh() == 10  # nothing was flushed after 0..9 yet
    a.flush()
    assert b.refresh() == 4
    assert not b.check(0, 14).any() and np.array_equal(b.rows(10, 14), pixels_of(data, 10, 14))
    a.close()
    b.close()
    c = pc.PixelCache.open(croot, data, SPEC, None)
    assert c.writable  # the lock goes with the writer
    c.close()


def test_unflushed_rows_are_not_visible(data, croot):
    a = pc.PixelCache.open(croot, data, SPEC, None)
    fill(a, data, 0, 5)
    b = pc.PixelCache.open(croot, data, SPEC, None, write=False)
    assert (b.state == pc.MISS).all()
    b.close()
    a.close()


def test_check_space_message(tmp_path, monkeypatch):
    monkeypatch.setattr(pc.format, "_free_bytes", lambda path: 3 * 10 ** 9)
    pc.check_space(str(tmp_path), 10, (224, 224, 3))
    with pytest.raises(pc.CacheFull) as e:
        pc.check_space(str(tmp_path / "new" / "dir"), 50000, (224, 224, 3))
    msg = str(e.value)
    assert "\n" not in msg and "7.53 GB" in msg and "3.00 GB" in msg and "50000 images" in msg
    assert pc.required_bytes(50000, (224, 224, 3)) == 50000 * (150528 + pc.RECORD.itemsize)


def test_open_without_space_is_read_only(data, croot, monkeypatch):
    build_full(croot, data.__class__(data.root, data.paths[:4], data.labels[:4], data.class_names, data.layout))
    monkeypatch.setattr(pc.format, "_free_bytes", lambda path: 100)
    c = pc.PixelCache.open(croot, data, SPEC, None)
    assert not c.writable and "needs" in c.note
    assert (c.state[:4] == pc.HIT_OK).all()
    c.close()
    c = pc.PixelCache.open(croot, data, SPEC, None)  # the lock was let go
    assert not c.writable
    monkeypatch.undo()
    c.close()
    c = pc.PixelCache.open(croot, data, SPEC, None)
    assert c.writable
    c.close()


def _tmpfs(path, size="2m"):
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode == 0


@pytest.mark.parametrize("how", ["tmpfs", "pwrite"])
def test_disk_full_mid_run(tmp_path, monkeypatch, how):
    ds = make_files(str(tmp_path / "data"), n=100)
    spec = PreprocessSpec(resize=80, crop=64)  # 12 KiB a row: 1.2 MB for all
    croot = str(tmp_path / "small")
    mounted = how == "tmpfs" and _tmpfs(croot)
    if how == "tmpfs" and not mounted:
        pytest.skip("cannot mount a small tmpfs here (needs root); the pwrite case simulates it")
    try:
        c = pc.PixelCache.open(croot, ds, spec, None)
        assert c.writable, c.note
        fill(c, ds, 0, 20)
        c.flush()
        if mounted:  # fill the disk behind the cache's back
            with open(os.path.join(croot, "filler"), "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
        else:  # no tmpfs here: the same through pwrite
            real = os.pwrite

            def full(fd, data, offset):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(os, "pwrite", full)
        with pytest.raises(pc.CacheFull) as e:
            for lo in range(20, 100, 10):
                fill(c, ds, lo, lo + 10)
        assert "disk is full" in str(e.value) and "\n" not in str(e.value)
        assert not c.writable
        fill(c, ds, 90, 100)  # a no-op now: the run goes on without writing
        c.close()
        if mounted:
            os.unlink(os.path.join(croot, "filler"))
        else:
            monkeypatch.setattr(os, "pwrite", real)
        c = pc.PixelCache.open(croot, ds, spec, None)
        assert c.writable
        assert (c.state[:20] == pc.HIT_OK).all()
        assert not c.check(0, 100).any()
        hits = c.state == pc.HIT_OK
        assert np.array_equal(c.rows(0, 100)[hits], pixels_of(ds, 0, 100, spec.shape)[hits])
        for lo in range(0, 100, 10):
            miss = c.state[lo:lo + 10] == pc.MISS
            if miss.any():
                status = np.where(miss, OK, 0).astype(np.int8)
                c.put(lo, pixels_of(ds, lo, lo + 10, spec.shape), status, {})
        c.close()
        c = pc.PixelCache.open(croot, ds, spec, None, write=False)
        assert (c.state == pc.HIT_OK).all() and not c.check(0, 100).any()
        c.close()
    finally:
        if mounted:
            subprocess.run(["umount", croot], check=False)


def test_export_bin(data, croot, tmp_path):
    build_full(croot, data, failed=(1,))
    c = pc.PixelCache.open(croot, data, SPEC, None, write=False)
    out = str(tmp_path / "u8")
    n = pc.export_bin(c, data, out)
    assert n == len(data) - 1
    want = pixels_of(data, 0, len(data))
    stem = os.path.splitext(os.path.basename(data.paths[5]))[0]
    got = np.fromfile(os.path.join(out, stem + ".bin"), np.uint8)
    assert np.array_equal(got, want[5].reshape(-1))
    with open(os.path.join(out, "prep_bin.info")) as f:
        info = [line.split() for line in f]
    assert len(info) == n
    assert info[0][0] == "0" and info[0][2:] == ["8", "8"] and info[0][1].endswith(".bin")
    with open(os.path.join(out, "images.tsv")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]
    assert [int(r[0]) for r in rows] == [i for i in range(len(data)) if i != 1]
    assert rows[4][1] == data.paths[5]

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = str(tmp_path / "f32")
    assert pc.export_bin(c, data, out, fmt="float32-nchw", mean=mean, std=std) == n
    got = np.fromfile(os.path.join(out, stem + ".bin"), np.float32).reshape(3, 8, 8)
    x = want[5].transpose(2, 0, 1).astype(np.float64) / 255
    ref = (x - np.array(mean).reshape(3, 1, 1)) / np.array(std).reshape(3, 1, 1)
    assert np.allclose(got, ref, atol=1e-6)
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(want[5]).permute(2, 0, 1).float().div(255)
    t = (t - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert np.array_equal(got, t.numpy())
    with pytest.raises(pc.PixelCacheError):
        pc.export_bin(c, data, out, fmt="float32-nchw")
    c.close()


def test_default_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(pc.CACHE_ENV, str(tmp_path))
    assert pc.default_pixel_cache_dir() == os.path.join(str(tmp_path), "pixels")
    monkeypatch.delenv(pc.CACHE_ENV)
    assert pc.default_pixel_cache_dir().endswith(os.path.join(".cache", "imagenet-engine", "pixels"))


def test_read_into_copies_and_checks(data, croot):
    d = build_full(croot, data, failed=(2,))
    rb = int(np.prod(SPEC.shape))
    with open(os.path.join(d, "pixels"), "r+b") as f:
        f.seek(6 * rb + rb - 1)
        b = f.read(1)
        f.seek(6 * rb + rb - 1)
        f.write(bytes([b[0] ^ 0x80]))
    c = pc.PixelCache.open(croot, data, SPEC, None, write=False)
    out = np.full((16,) + SPEC.shape, 7, np.uint8)
    bad = c.read_into(0, 16, out, chunk=3)
    assert list(np.nonzero(bad)[0]) == [6] and c.state[6] == pc.MISS
    want = pixels_of(data, 0, 16)
    good = [i for i in range(16) if i not in (2, 6)]
    assert np.array_equal(out[good], want[good])
    assert (out[2] == 7).all()  # a failed image's row is left alone
    st = c.stats()
    assert st["hits"] == 15 and st["rejected"] == 1
    c.close()


def test_read_only_open_of_no_cache(data, tmp_path):
    where = str(tmp_path / "none" / "here")
    c = pc.PixelCache.open(where, data, SPEC, None, write=False)
    assert (c.state == pc.MISS).all() and not c.writable and not os.path.exists(where)
    assert not c.check(0, len(data)).any()
    c.put(0, pixels_of(data, 0, 2), np.full(2, OK, np.int8), {})
    c.flush()
    c.close()


def test_broken_symlink_failure_is_cached(data, croot, tmp_path):
    link = os.path.join(data.root, "a", "img_9999.jpg")
    os.symlink(str(tmp_path / "gone.jpg"), link)
    ds = build_dataset(data.root)
    i = ds.paths.index(os.path.join("a", "img_9999.jpg"))
    build_full(croot, ds, failed=(i,), reasons={i: "broken symlink (points to gone.jpg)"})
    c = pc.PixelCache.open(croot, ds, SPEC, None, write=False)
    assert c.state[i] == pc.HIT_FAILED and c.reason(i) == "broken symlink (points to gone.jpg)"
    assert (np.delete(c.state, i) == pc.HIT_OK).all() and c.stats()["rejected"] == 0
    c.close()
    with open(tmp_path / "gone.jpg", "wb") as f:  # the target appears: no longer that failure
        f.write(b"now an image")
    c = pc.PixelCache.open(croot, ds, SPEC, None, write=False)
    assert c.state[i] == pc.MISS
    c.close()


def test_counts_from_threads(data, croot):
    from concurrent.futures import ThreadPoolExecutor

    build_full(croot, data)
    c = pc.PixelCache.open(croot, data, SPEC, None, write=False)
    with ThreadPoolExecutor(4) as ex:
        for _ in range(50):
            c.state[:] = pc.HIT_OK
            list(ex.map(lambda lo: c.check(lo, lo + 1), range(len(data))))
    assert c.stats()["hits"] == 50 * len(data)
    c.close()


def test_failed_fdatasync_drops_its_rows(data, croot, monkeypatch):
    c = pc.PixelCache.open(croot, data, SPEC, None)
    fill(c, data, 0, 8)
    c.flush()
    fill(c, data, 8, 16)
    real = os.fdatasync

    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    with pytest.raises(pc.PixelCacheError) as e:
        c.flush()
    assert not isinstance(e.value, pc.CacheFull) and "Input/output error" in str(e.value)
    assert not c.writable
    monkeypatch.setattr(os, "fdatasync", real)
    c.close()
    c = pc.PixelCache.open(croot, data, SPEC, None)
    assert (c.state[:8] == pc.HIT_OK).all() and (c.state[8:] == pc.MISS).all()
    assert not os.path.exists(os.path.join(c.dir, "complete.json.tmp.%d" % os.getpid()))
    c.close()


def test_pixels_cut_short_while_open(data, croot):
    d = build_full(croot, data)
    rb = int(np.prod(SPEC.shape))
    c = pc.PixelCache.open(croot, data, SPEC, None, write=False)
    os.truncate(os.path.join(d, "pixels"), 12 * rb)
    bad = c.check(8, 16)
    assert list(np.nonzero(bad)[0]) == [4, 5, 6, 7] and (c.state[12:16] == pc.MISS).all()
    out = np.zeros((8,) + SPEC.shape, np.uint8)
    bad = c.read_into(16, 24, out)
    assert bad.all() and (c.state[16:] == pc.MISS).all()
    assert c.stats()["rejected"] == 12 and c.stats()["hits"] == 4
    c.close()


def test_reader_while_a_writer_writes(tmp_path, croot):
    ds = make_files(str(tmp_path / "data"), n=60)
    script = WRITER.format(root=ROOT, tests=os.path.join(ROOT, "tests"), data=ds.root, croot=croot)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b"open", p.stderr.read().decode()
        r = pc.PixelCache.open(croot, ds, SPEC, None)
        assert not r.writable
        want = pixels_of(ds, 0, len(ds))
        seen = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            r.refresh()
            hits = np.nonzero(r.state == pc.HIT_OK)[0]
            seen = max(seen, len(hits))
            assert not r.check(0, len(ds)).any()
            assert np.array_equal(r.rows(0, len(ds))[hits], want[hits])
        r.close()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert seen > 0


def test_pixel_limit_is_keyed_as_the_workers_apply_it(data):
    from preprocess.worker import pixel_limit

    default = pc.pixel_key(SPEC, None, data.root)
    assert default == pc.pixel_key(SPEC, pixel_limit(None), data.root)
    assert default != pc.pixel_key(SPEC, 1000, data.root)

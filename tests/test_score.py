"""run-score: the manifest, shards, output rows, resume and refusals.

Runs use tiny PNGs (20x24, random pixels), 16-pixel crops and the sim backend, whose logits are
a function of the pixels, so two runs of the same images must give identical rows.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from typing import Dict, List, Optional

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from engine.classes import imagenet_classes  # noqa: E402
from engine.scoring.manifest import (ShardError, build_manifest, from_paths, load_manifest, resolve_shard,  # noqa: E402
                             shard_parts)
from engine.scoring.writer import COLUMNS, OutputDir  # noqa: E402

RUN_SCORE = os.path.join(ROOT, "bin", "run-score")
FAST = ["--backend", "sim", "--sim-batch-ms", "1", "--workers", "1", "--batch-size", "4",
        "--resize", "16", "--crop", "16", "--model", "resnet18", "--no-progress"]


# -- helpers (also used by test_score_faults.py and test_ray.py) ----------------------------------
def make_tiny(root: str, n: int, seed: int = 0, folders: int = 3) -> List[str]:
    """n small random PNGs in `folders` subfolders; returns their relative paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rels = []
    for i in range(n):
        rel = os.path.join(f"d{i % folders}", f"im{i:04d}.png")
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(os.path.join(root, rel))
        rels.append(rel)
    return rels


def score_cmd(data: str, out: str, *extra: str) -> List[str]:
    return [sys.executable, RUN_SCORE, "--data", data, "--out", out] + FAST + list(extra)


def child_env(extra: Optional[Dict[str, str]] = None, drop=("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
                                                             "RANK", "WORLD_SIZE")) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def run_score(data: str, out: str, *extra: str, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    """run-score in a subprocess with a hard timeout (its whole process group is killed on expiry)."""
    p = subprocess.Popen(score_cmd(data, out, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=child_env(env), cwd=ROOT, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        raise AssertionError(f"run-score did not finish within {timeout} s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


def done_parts(out: str) -> Dict[int, Dict]:
    with open(os.path.join(out, "run.json")) as f:
        meta = json.load(f)
    od = OutputDir(out, meta["parts"], meta["format"])
    return od.done_records(range(od.num_parts))


def read_rows(out: str, check_parts: bool = True) -> List[Dict]:
    """Every row of every done part (parquet, jsonl or csv), checking each part holds exactly its ids."""
    with open(os.path.join(out, "run.json")) as f:
        meta = json.load(f)
    od = OutputDir(out, meta["parts"], meta["format"])
    rows = []
    for p, rec in sorted(od.done_records(range(od.num_parts)).items()):
        part_rows = read_part(od.part_path(p), meta["format"])
        if check_parts:
            lo = p * meta["part_size"]
            hi = min(meta["manifest_images"], lo + meta["part_size"])
            assert [r["id"] for r in part_rows] == list(range(lo, hi)), f"part {p} does not hold ids {lo}..{hi - 1}"
            assert rec["rows"] == hi - lo
        rows.extend(part_rows)
    return rows


def read_part(path: str, fmt: str) -> List[Dict]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        assert tuple(table.column_names) in (COLUMNS, COLUMNS + ("label",))  # label: a labelled --data
        return table.to_pylist()
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        r = list(csv.reader(f))
    assert tuple(r[0]) in (COLUMNS, COLUMNS + ("label",))
    out = []
    for row in r[1:]:
        d = dict(zip(r[0], row))
        out.append({"id": int(d["id"]), "path": d["path"],
                    "topk_index": json.loads(d["topk_index"]) if d["topk_index"] else None,
                    "topk_prob": json.loads(d["topk_prob"]) if d["topk_prob"] else None,
                    "top1_wnid": d["top1_wnid"] or None, "top1_name": d["top1_name"] or None,
                    "error": d["error"] or None})
        if "label" in d:
            out[-1]["label"] = int(d["label"]) if d["label"] else None
    return out


def predictions(rows: List[Dict]) -> Dict[int, tuple]:
    """id -> (path, top-k, probabilities rounded to float32, error); asserts each id appears once."""
    out: Dict[int, tuple] = {}
    for r in rows:
        assert r["id"] not in out, f"id {r['id']} appears twice"
        prob = None if r["topk_prob"] is None else tuple(np.float32(r["topk_prob"]).tolist())
        out[r["id"]] = (r["path"], None if r["topk_index"] is None else tuple(r["topk_index"]), prob, r["error"])
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny"))
    make_tiny(root, 46)
    return root


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted run over `tiny` (parquet, parts of 8)."""
    out = str(tmp_path_factory.mktemp("ref") / "out")
    r = run_score(tiny, out, "--part-size", "8")
    assert r.returncode == 0, r.stderr
    return out, predictions(read_rows(out))


# -- manifest and shards ---------------------------------------------------------------------------
def test_manifest_is_stable_sorted_and_independent_of_where_the_data_is(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    rels = make_tiny(a, 12, seed=3)
    for rel in reversed(rels):  # the same files, created in the opposite order, elsewhere
        os.makedirs(os.path.join(b, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(a, rel), "rb") as src, open(os.path.join(b, rel), "wb") as dst:
            dst.write(src.read())
    with open(os.path.join(a, "notes.txt"), "w") as f:
        f.write("not an image")
    m1, m2, m3 = build_manifest(a), build_manifest(a), build_manifest(b)
    assert m1.sha256 == m2.sha256 == m3.sha256
    assert list(m1.paths) == sorted(rels) and m1.root != m3.root
    assert all(m1.sizes == [os.path.getsize(os.path.join(a, p)) for p in m1.paths])
    # a list file naming the same images (shuffled, one twice, relative to the list's folder)
    listing = os.path.join(a, "list.txt")
    with open(listing, "w") as f:
        f.write("# images\n" + "\n".join(list(reversed(rels)) + [rels[0]]) + "\n")
    assert build_manifest(listing).sha256 == m1.sha256
    # one byte more in one file, or one file fewer: another manifest
    with open(os.path.join(b, rels[5]), "ab") as f:
        f.write(b"\0")
    assert build_manifest(b).sha256 != m1.sha256
    assert build_manifest(a, limit=11).sha256 != m1.sha256
    # written and read back, awkward names included
    odd = from_paths(a, ["x\ty.png", "new\nline.png", "back\\slash.png", "ünï cödé.png"])
    path = str(tmp_path / "manifest.tsv")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(odd.text())
    back = load_manifest(path)
    assert back.paths == odd.paths and back.sha256 == odd.sha256 and list(back.sizes) == [-1] * 4


@pytest.mark.parametrize("num_parts", [0, 1, 2, 5, 17, 100])
def test_shards_are_disjoint_contiguous_and_cover_every_part(num_parts):
    for n in range(1, 10):
        seen: List[int] = []
        for i in range(n):
            r = shard_parts(num_parts, i, n)
            assert r.step == 1
            seen.extend(r)
        assert seen == list(range(num_parts)), (num_parts, n)


def test_shard_comes_from_the_flag_then_slurm_then_rank():
    assert resolve_shard("2/5", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3"})[:2] == (2, 5)
    assert resolve_shard(None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "RANK": "0",
                                "WORLD_SIZE": "2"})[:2] == (3, 4)
    # --array=1-4: ids 1..4 are shards 0..3; --array=0-12:4: ids 0,4,8,12
    assert resolve_shard(None, {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4",
                                "SLURM_ARRAY_TASK_MIN": "1"})[:2] == (3, 4)
    assert resolve_shard(None, {"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "4",
                                "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "4"})[:2] == (2, 4)
    assert resolve_shard(None, {"RANK": "1", "WORLD_SIZE": "2"})[:2] == (1, 2)
    assert resolve_shard(None, {})[:2] == (0, 1)
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ShardError):
            resolve_shard(bad, {})
    with pytest.raises(ShardError):
        resolve_shard(None, {"RANK": "2", "WORLD_SIZE": "2"})


# -- output ----------------------------------------------------------------------------------------
def test_rows_have_the_schema_metadata_and_softmax_topk(tiny, reference):
    import pyarrow.parquet as pq

    out, ref = reference
    m = load_manifest(os.path.join(out, "manifest.tsv"))
    assert sorted(ref) == list(range(46)) and [ref[i][0] for i in range(46)] == list(m.paths)
    assert len(done_parts(out)) == 6 and os.path.exists(os.path.join(out, "_SUCCESS"))
    schema = pq.read_schema(os.path.join(out, "part-00000.parquet"))
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert meta["model"] == "resnet18" and meta["manifest_sha256"] == m.sha256
    assert json.loads(meta["preprocessing"])["crop"] == 16 and meta["engine_version"]
    assert "weights_sha256" in meta
    classes = imagenet_classes()
    for r in read_rows(out):
        assert r["error"] is None and len(r["topk_index"]) == 5
        p = r["topk_prob"]
        assert all(p[j] >= p[j + 1] for j in range(4)) and 0 < sum(p) <= 1.0001
        # sim logits: 5, 4, 3, 2, 1 on top, top+7, ...; zeros elsewhere (engine/backends/sim.py)
        top = r["topk_index"][0]
        assert r["topk_index"] == [(top + 7 * j) % 1000 for j in range(5)]
        e = np.exp(np.array([5, 4, 3, 2, 1, 0], np.float64))
        assert p[0] == pytest.approx(e[0] / (e[:5].sum() + 995 * e[5]), rel=1e-6)
        assert (r["top1_wnid"], r["top1_name"]) == classes[top]


def test_formats_jsonl_and_csv_hold_the_same_rows(tiny, reference, tmp_path):
    _, ref = reference
    for fmt in ("jsonl", "csv"):
        out = str(tmp_path / fmt)
        r = run_score(tiny, out, "--part-size", "20", "--format", fmt, "--topk", "5")
        assert r.returncode == 0, r.stderr
        assert {f"part-00000.{fmt}", "part-00000.done", "part-00002.done"} <= set(os.listdir(out))
        assert predictions(read_rows(out)) == ref


def test_a_corrupt_image_is_an_error_row(tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    make_tiny(data, 6)
    with open(os.path.join(data, "d0", "bad.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not really a png")
    open(os.path.join(data, "d1", "empty.jpg"), "wb").close()
    os.rename(os.path.join(data, "d2", "im0002.png"), os.fsencode(os.path.join(data, "d2")) + b"/caf\xe9.png")
    r = run_score(data, out, "--part-size", "3", "--format", "jsonl")
    assert r.returncode == 1, r.stderr  # some images failed
    rows = {row["path"]: row for row in read_rows(out)}
    assert len(rows) == 8
    assert rows["d2/caf\\xe9.png"]["error"] is None  # a name that is not UTF-8: scored, escaped
    for name in ("d0/bad.png", "d1/empty.jpg"):
        row = rows[name]
        assert row["error"] and row["topk_index"] is None and row["topk_prob"] is None and row["top1_name"] is None
    assert sum(row["error"] is None for row in rows.values()) == 6
    assert "2 failed" in r.stdout


def test_a_mismatched_resume_is_refused(tiny, reference, tmp_path):
    out = str(tmp_path / "out")
    r = run_score(tiny, out, "--part-size", "8", "--limit", "20")
    assert r.returncode == 0, r.stderr
    before = sorted(os.listdir(out))
    for extra, words in ((["--topk", "3"], "topk: 5 there, 3 now"),
                         (["--crop", "8", "--resize", "8"], "preprocessing"),
                         (["--part-size", "5"], "part_size"),
                         (["--format", "csv"], "format"),
                         ([], "manifest")):  # no --limit: other images
        args = ["--part-size", "8", "--limit", "20"] + extra if extra else ["--part-size", "8"]
        r = run_score(tiny, out, *args)
        assert r.returncode == 2, (extra, r.stderr)
        assert "refusing" in r.stderr or "manifest" in r.stderr
        assert words in r.stderr, (words, r.stderr)
    r = run_score(tiny, out, "--part-size", "8", "--limit", "20", "--no-resume")
    assert r.returncode == 2 and "already holds" in r.stderr
    assert sorted(os.listdir(out)) == before  # nothing was touched
    # the same options resume (nothing to do) and agree with the reference
    r = run_score(tiny, out, "--part-size", "8", "--limit", "20")
    assert r.returncode == 0 and "0 written now" in r.stdout, r.stdout
    assert predictions(read_rows(out)) == {i: v for i, v in reference[1].items() if i < 20}


def test_resume_redoes_exactly_the_parts_not_recorded_done(tiny, reference, tmp_path):
    import shutil

    out = str(tmp_path / "out")
    shutil.copytree(reference[0], out)
    os.unlink(os.path.join(out, "_SUCCESS"))
    os.unlink(os.path.join(out, "part-00001.done"))  # crashed after the rename, before the record
    os.unlink(os.path.join(out, "part-00003.parquet"))  # a record whose file is gone
    with open(os.path.join(out, "part-00004.parquet"), "r+b") as f:  # a record that no longer fits
        f.truncate(100)
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()  # a pid that is gone
    for tmp in (f".part-00002.parquet.tmp-{socket.gethostname()}-{dead.pid}",  # a dead writer's, this host
                f".part-00001.done.tmp-elsewhere-{os.getpid()}"):  # a part to redo: any tmp of it goes
        with open(os.path.join(out, tmp), "wb") as f:
            f.write(b"half")
    with open(os.path.join(out, ".part-00005.parquet.tmp-elsewhere-1"), "wb") as f:
        f.write(b"maybe a live writer on another machine: left alone")
    r = run_score(tiny, out, "--part-size", "8")
    assert r.returncode == 0, r.stderr
    assert "3 were done, 3 written now" in r.stdout, r.stdout
    assert [n for n in os.listdir(out) if ".tmp-" in n] == [".part-00005.parquet.tmp-elsewhere-1"]
    assert predictions(read_rows(out)) == reference[1]
    assert os.path.exists(os.path.join(out, "_SUCCESS"))


def test_shards_write_one_folder_and_the_last_writes_success(tiny, reference, tmp_path):
    out = str(tmp_path / "out")
    runs = [(["--shard", "0/3"], None),
            ([], {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}),
            ([], {"RANK": "2", "WORLD_SIZE": "3"})]
    for _k, (args, env) in enumerate(runs):
        assert not os.path.exists(os.path.join(out, "_SUCCESS"))
        r = run_score(tiny, out, "--part-size", "8", *args, env=env)
        assert r.returncode == 0, r.stderr
    assert "shard         2/3 (RANK/WORLD_SIZE): parts 4-5" in r.stdout, r.stdout
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    with open(os.path.join(out, "_SUCCESS")) as f:
        assert json.load(f)["images"] == 46
    assert predictions(read_rows(out)) == reference[1]
    # a shard count larger than the part count: empty shards succeed at once
    r = run_score(tiny, out, "--part-size", "8", "--shard", "0/10")
    assert r.returncode == 0 and "no parts" in r.stdout


def test_summary_reports_rate_and_progress_goes_to_stderr(tiny, tmp_path):
    r = run_score(tiny, str(tmp_path / "out"), "--part-size", "10", "--json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "s.json") as f:
        s = json.load(f)
    assert s["images"] == 46 and s["failed"] == 0 and s["parts_written"] == 5 and s["success"]
    assert s["img_per_s"] > 0 and s["wall_s"] > 0
    assert "img/s" in r.stdout and "_SUCCESS written" in r.stdout
    cmd = [a for a in score_cmd(tiny, str(tmp_path / "o2"), "--part-size", "10") if a != "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=120)
    assert p.returncode == 0 and "img/s" in p.stderr and "eta" in p.stderr, p.stderr


# -- the reducer, in process ---------------------------------------------------------------------
def test_topk_rows_matches_the_metrics_tie_rule():
    from engine.backends.sim import sim_logits
    from engine.report.metrics import topk_indices
    from engine.scoring.job import softmax_topk, topk_rows

    rng = np.random.default_rng(2)
    for trial in range(300):
        n, c, k = int(rng.integers(1, 30)), int(rng.choice([5, 40, 1000])), int(rng.integers(1, 30))
        kind = trial % 3
        if kind == 0:
            logits = rng.standard_normal((n, c)).astype(np.float32)
        elif kind == 1:
            logits = rng.integers(0, 4, (n, c)).astype(np.float32)  # ties everywhere
        else:
            logits = sim_logits(rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), c)
        assert (topk_rows(logits, k) == topk_indices(logits, k)).all(), (trial, n, c, k)
    logits = rng.standard_normal((4, 50)).astype(np.float32)
    logits[1, 3], logits[2, :] = np.nan, -np.inf
    logits[3, 7] = np.inf
    idx, prob, finite = softmax_topk(logits, 5)
    assert finite.tolist() == [True, False, False, False]
    e = np.exp(logits[0].astype(np.float64) - logits[0].max())
    assert np.allclose(prob[0], np.sort(e / e.sum())[::-1][:5], rtol=1e-5)


def test_router_buffers_out_of_order_batches_into_whole_parts():
    from engine.pipeline.scheduler import BatchResult
    from engine.scoring.job import PartRouter

    class Writer:
        error = None

        def __init__(self):
            self.parts = []

        def submit(self, rows):
            self.parts.append(rows)

    m = from_paths("/nowhere", [f"img{i:03d}.png" for i in range(23)])
    w = Writer()
    router = PartRouter(m, part_size=5, k=3, writer=w)
    rng = np.random.default_rng(0)
    batches = [(lo, min(23, lo + 4)) for lo in range(0, 23, 4)]  # batches of 4 straddle parts of 5
    rng.shuffle(batches)
    for b, (lo, hi) in enumerate(batches):
        ids = np.arange(lo, hi)
        logits = np.zeros((hi - lo, 10), np.float32)
        logits[np.arange(hi - lo), ids % 10] = 1.0  # the top class encodes the id
        ok = np.ones(hi - lo, bool)
        failures = []
        if lo <= 7 < hi:
            ok[7 - lo] = False
            failures.append((7 - lo, "broken"))
        if lo <= 12 < hi:
            logits[12 - lo, 0] = np.nan
        router.reduce(BatchResult(b, lo, ids, np.full(hi - lo, -1), ok, logits, failures))
    assert sorted(p.part for p in w.parts) == [0, 1, 2, 3, 4] and not router.buffers
    for p in w.parts:
        assert p.lo == 5 * p.part and p.n == min(5, 23 - p.lo) and list(p.paths) == list(m.paths[p.lo:p.lo + p.n])
        for j in range(p.n):
            i = p.lo + j
            if i == 7:
                assert p.errors[j] == "broken"
            elif i == 12:
                assert "not finite" in p.errors[j]
            else:
                assert p.errors[j] is None and p.topk_index[j, 0] == i % 10
    assert router.images == 23 and router.failed == 2
    with pytest.raises(RuntimeError, match="reduced twice"):
        router.reduce(BatchResult(0, 0, np.arange(0, 2), np.full(2, -1), np.ones(2, bool),
                                  np.zeros((2, 10), np.float32), []))
        router.reduce(BatchResult(0, 0, np.arange(1, 3), np.full(2, -1), np.ones(2, bool),
                                  np.zeros((2, 10), np.float32), []))


# -- labels and --summarize ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_summarize_counts_like_run_eval_across_shards(folder_set, tmp_path, fmt):
    """Two shards into one folder, then --summarize: the same counts run-eval gives on the images."""
    out = str(tmp_path / "out")
    common = ["--backend", "sim", "--sim-batch-ms", "0", "--part-size", "32", "--format", fmt, "--topk", "5"]
    for shard in ("0/2", "1/2"):
        r = run_score(folder_set, out, *common, "--shard", shard)
        assert r.returncode == 0, r.stderr
    rows = read_rows(out)
    assert {r["label"] for r in rows} <= set(range(1000)) and len(rows) == 120  # ImageNet wnid folders
    r = subprocess.run([sys.executable, RUN_SCORE, "--summarize", out], capture_output=True, text=True,
                       env=child_env(), cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.load(open(os.path.join(out, "summary.json")))
    ev = tmp_path / "eval.json"
    same = ["--resize", "16", "--crop", "16", "--model", "resnet18"]  # FAST's preprocessing: the same pixels
    e = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "run-eval"), "--data", folder_set, "--backend",
                        "sim", "--sim-batch-ms", "0", "--workers", "1", "--no-progress", "--json", str(ev)] + same,
                       capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=120)
    assert e.returncode == 0, e.stderr
    want = json.load(open(ev))
    for k in ("images", "failed", "correct_top1", "correct_top5", "top1", "top5", "per_class"):
        assert summary[k] == want[k], k
    assert "top-1" in r.stdout and summary["parts_missing"] == 0


def test_summarize_refuses_rows_without_labels(tiny, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(os.path.join(tiny, f"d0/im{i:04d}.png") for i in (0, 3, 6)) + "\n")
    out = str(tmp_path / "out")
    r = run_score(str(listing), out, "--part-size", "8")
    assert r.returncode == 0, r.stderr
    assert "label" not in read_rows(out)[0]  # a list of files has no labels
    r = subprocess.run([sys.executable, RUN_SCORE, "--summarize", out], capture_output=True, text=True,
                       env=child_env(), cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "have no label column" in r.stderr


def test_a_folder_from_before_labels_resumes_without_them(tiny, tmp_path):
    out = str(tmp_path / "out")
    r = run_score(tiny, out, "--part-size", "8", "--limit", "16")
    assert r.returncode == 0, r.stderr
    # make it look like a folder written before the label column: no label in run.json's columns
    meta_path = os.path.join(out, "run.json")
    meta = json.load(open(meta_path))
    meta["columns"].remove("label")
    json.dump(meta, open(meta_path, "w"))
    od = OutputDir(out, meta["parts"], meta["format"])
    os.unlink(od.done_path(1))
    r = run_score(tiny, out, "--part-size", "8", "--limit", "16")
    assert r.returncode == 0, r.stderr
    import pyarrow.parquet as pq

    assert "label" not in pq.read_table(od.part_path(1)).column_names  # the folder's parts stay alike

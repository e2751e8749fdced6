"""Object storage: WebDataset and Parquet shards and a tar of images read from s3:// through fsspec.

The S3 server is moto's, started by the test on loopback (no network, no credentials). Needs the
`s3` extra (s3fs) and moto's server (a test dependency); both are skipped where they are not
installed: on the compat stack (Python 3.9) s3fs 2026.x and its aiobotocore do not install, so
these tests run on the main stack only.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed; on the compat stack it does not resolve")
moto_server = pytest.importorskip("moto.server", reason="moto[server] (a test dependency) is not installed")
pytest.importorskip("pyarrow")

from engine.pipeline.containers.write import items_of, write_parquet, write_tar, write_wds  # noqa: E402
from engine.pipeline.dataset import DatasetError, build_dataset, build_unlabelled  # noqa: E402
from preprocess.containers import ByteReader  # noqa: E402
from tests.conftest import ROOT, run_cli  # noqa: E402
from tests.test_containers import CLASSES, N, make_hue_model  # noqa: E402

EVAL = os.path.join(ROOT, "bin", "run-eval")
SCORE = os.path.join(ROOT, "bin", "run-score")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A loopback S3 server holding the same 40 images as a folder, WebDataset shards, Parquet shards
    and a flat tar; yields (environment for the commands, local folder)."""
    from engine.synthetic import make_dataset

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server._server.server_address[1]
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "IMAGENET_ENGINE_CACHE": str(tmp_path_factory.mktemp("s3cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import fsspec

        base = tmp_path_factory.mktemp("s3src")
        folder = str(base / "folder")
        make_dataset(folder, N, CLASSES, layout="folder", seed=5, workers=1)
        items = items_of(build_dataset(folder))
        write_wds(items, str(base / "wds"), shard_size=15)
        write_parquet(items, str(base / "parquet"), shard_size=16, row_group=5)
        write_tar(items, str(base / "val.tar"))
        (base / "val_label.txt").write_text("".join(f"{n} {l}\n" for _, n, l in items))
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("bucket")
        for sub in ("wds", "parquet"):
            for name in sorted(os.listdir(base / sub)):
                fs.put_file(str(base / sub / name), f"bucket/{sub}/{name}")
        fs.put_file(str(base / "val.tar"), "bucket/val.tar")
        yield env, folder, str(base / "val_label.txt")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def hue_model(tmp_path_factory):
    return make_hue_model(str(tmp_path_factory.mktemp("hue") / "hue.ts"))


@pytest.mark.parametrize("data", ["s3://bucket/wds", "s3://bucket/wds/val-{000000..000002}.tar", "s3://bucket/parquet",
                                  "s3://bucket/parquet/validation-*.parquet", "s3://bucket/val.tar"])
def test_s3_layouts_give_the_folders_images(s3, data):
    env, folder, labels = s3
    ref = build_dataset(folder)
    ds = build_dataset(data, labels if data.endswith("val.tar") else None)
    assert len(ds) == N
    np.testing.assert_array_equal(ds.labels, ref.labels)
    assert all(f.startswith("s3://bucket/") for f in ds.container.files)
    reader = ByteReader()
    for i in range(N):
        with open(ref.abspath(i), "rb") as f:
            assert reader.read(ds.locator(i)) == f.read(), (data, i)
    reader.close()


def test_s3_run_eval_counts_match_the_folder(s3, hue_model, tmp_path):
    env, folder, _ = s3
    counts = {}
    for name, data in (("folder", folder), ("wds", "s3://bucket/wds"), ("parquet", "s3://bucket/parquet")):
        out = tmp_path / f"{name}.json"
        r = run_cli([EVAL, "--data", data, "--ts", hue_model, "--backend", "cpu", "--resize", "64", "--crop", "56",
                     "--batch-size", "8", "--workers", "2", "--no-progress", "--json", str(out)], env=env)
        assert r.returncode == 0, r.stderr
        rep = json.loads(out.read_text())
        counts[name] = (rep["images"], rep["failed"], rep["correct_top1"], rep["correct_top5"])
    assert counts["folder"][0] == N
    assert counts["wds"] == counts["folder"] == counts["parquet"]


def test_s3_run_score_names_and_a_missing_shard(s3, tmp_path):
    env, _, _ = s3
    out = tmp_path / "out"
    data = "s3://bucket/wds/val-{000000..000003}.tar"  # the 4th shard does not exist: a failed image
    r = run_cli([SCORE, "--data", data, "--out", str(out), "--backend", "sim", "--sim-batch-ms", "1",
                 "--batch-size", "8", "--workers", "2", "--format", "jsonl", "--no-progress"], env=env)
    rows = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".jsonl"):
            rows += [json.loads(l) for l in (out / name).read_text().splitlines()]
    assert len(rows) == N + 1, r.stderr
    names = [r["path"] for r in sorted(rows, key=lambda r: r["id"])]
    assert names[0] == "val-000000.tar:ILSVRC2012_val_00000001" and names[-1] == "val-000003.tar"
    assert build_unlabelled("s3://bucket/parquet").paths[17] == "validation-00001-of-00003.parquet:1"


def test_s3_errors_are_one_line(s3):
    with pytest.raises(DatasetError, match="s3://bucket/nothing-here/: no such object or prefix"):
        build_dataset("s3://bucket/nothing-here/")
    with pytest.raises(DatasetError, match="s3://bucket/missing.tar: cannot read missing.tar as a tar"):
        build_dataset("s3://bucket/missing.tar", "x")

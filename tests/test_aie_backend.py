"""The `aie` backend against the torch_aie stand-in (tests/fakes/torch_aie).

Importing the stand-in installs a fake "npu" device in the process for good, so everything that
touches it runs in subprocesses with PYTHONPATH=tests/fakes:<repo>. Two scripts do the work (a
torch import costs seconds here) and the tests check their JSON:

- EVAL: run_eval over 1000 tiny JPEGs with a static model compiled for 32 (a short last batch of
  8), a dynamic 1..32 model, the uint8-accepted variant, and the cpu backend as the reference;
  the stand-in's counters say how many images crossed to the device (padding included).
- UNIT: the backend in-process: uint8 accepted / refused against host-side normalisation, the
  compile cache, the bench following simulated device time (and failing without synchronize),
  errors, `--backend auto`, finalize at exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKES = os.path.join(ROOT, "tests", "fakes")
N_IMAGES, BATCH, SIDE = 1000, 32, 32


def make_tiny_ts(path: str, data: str = None, seed: int = 0) -> str:
    """A TorchScript classifier small enough for 1000 images in a second: conv, pool, linear to 1000
    classes. Given `data` (a make_tiny_set folder), its first 10 classes are nearest-centroid
    classifiers of that set, so top-1 is far from 0 and a changed prediction changes the counts."""
    import warnings

    import torch

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 1000)).eval()
    with torch.no_grad():
        net[4].weight[10:] = 0
        net[4].bias[10:] = -10.0
        if data:
            from PIL import Image

            feats = []
            for c in range(10):
                d = os.path.join(data, f"class{c:02d}")
                xs = [np.asarray(Image.open(os.path.join(d, f)).convert("RGB").resize((SIDE, SIDE)))
                      for f in sorted(os.listdir(d))[:8]]
                x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255.0
                x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
                    [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
                feats.append(net[:4](x).mean(0))
            mu = torch.stack(feats)
            w = (mu - mu.mean(0)) * 50.0
            net[4].weight[:10] = w
            net[4].bias[:10] = -(w * (mu + mu.mean(0)) / 2).sum(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(net, torch.zeros(1, 3, SIDE, SIDE)).save(path)
    return path


def make_tiny_set(root: str, n: int = N_IMAGES, classes: int = 10, seed: int = 0) -> str:
    """n tiny (64x48) JPEGs in `classes` ImageFolder folders; colour depends on the class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % classes
        d = os.path.join(root, f"class{c:02d}")
        os.makedirs(d, exist_ok=True)
        a = rng.integers(0, 256, (48, 64, 3)).astype(np.int64) // 2
        a[..., c % 3] += 12 * c
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(os.path.join(d, f"img{i:05d}.jpg"), quality=85)
    return root


def run_script(code: str, env=None, timeout: int = 240) -> dict:
    """Run `code` with the stand-in importable; returns the JSON its last stdout line prints."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([FAKES, ROOT] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e.update(env or {})
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       timeout=timeout, env=e, cwd=ROOT)
    assert p.returncode == 0, f"script failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON from the script:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    out = json.loads(lines[-1])
    out["_stdout"] = p.stdout
    out["_stderr"] = p.stderr
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("aie")
    data = make_tiny_set(str(d / "set"))
    return {"ts": make_tiny_ts(str(d / "tiny.ts"), data), "data": data,
            "cache": str(d / "cache"), "dir": str(d)}


EVAL = """
import io, json, sys, warnings
warnings.simplefilter("ignore")
import torch_aie
from torch_aie import _stand_in
from engine.config import resolve_config
from engine.evaluate import run_eval

TS, DATA, CACHE, BATCH, SIDE = sys.argv[1:6]
out = {}
def run(name, backend, **kw):
    _stand_in.reset()
    _stand_in.ACCEPT_UINT8 = kw.pop("uint8", False)
    cfg = resolve_config("tiny", {"resize": int(SIDE), "crop": int(SIDE)}, data=DATA, ts=TS, backend=backend,
                         precision="fp32", batch_size=int(BATCH), workers=2, cache_dir=CACHE, progress=False,
                         compute_only_iters=1, **kw)
    report, status = run_eval(cfg, out=io.StringIO())
    out[name] = {"status": status, "images": report["images"], "failed": report["failed"],
                 "top1": report["correct_top1"], "top5": report["correct_top5"], "backend": report["backend"],
                 "stats": dict(_stand_in.STATS), "compiles": _stand_in.COMPILE_CALLS}
run("static", "aie", shape="static")
run("dynamic", "aie", shape="dynamic")
run("static_uint8", "aie", shape="static", uint8=True)
run("cpu", "cpu")
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def evaluated(tiny):
    code = EVAL.replace("sys.argv[1:6]", repr([tiny["ts"], tiny["data"], tiny["cache"], str(BATCH), str(SIDE)]))
    return run_script(code)


def _calls(n_images: int, batch: int, padded: bool):
    """(model calls, images through the model) for one eval: the batches, plus compute-only's
    2 warm-up + 1 timed calls at the full batch."""
    batches = -(-n_images // batch)
    images = batches * batch if padded else n_images
    return batches + 3, images + 3 * batch


def test_static_model_pads_the_short_last_batch_and_counts_every_image_once(evaluated):
    r = evaluated["static"]
    assert (r["status"], r["images"], r["failed"]) == (0, N_IMAGES, 0)
    assert N_IMAGES % BATCH == 8  # 31 full batches and a short one of 8
    calls, images = _calls(N_IMAGES, BATCH, padded=True)
    assert (r["stats"]["calls"], r["stats"]["images"]) == (calls, images)  # the device saw 1024, we count 1000
    assert r["backend"]["shape"] == "static" and r["backend"]["compiled_batch"] == BATCH
    # exactly the cpu backend's counts on the same TorchScript model
    ref = evaluated["cpu"]
    assert ref["images"] == N_IMAGES and ref["top1"] > 0.3 * N_IMAGES
    assert (r["top1"], r["top5"]) == (ref["top1"], ref["top5"])


def test_dynamic_model_runs_the_short_batch_without_padding(evaluated):
    r = evaluated["dynamic"]
    assert (r["status"], r["images"], r["failed"]) == (0, N_IMAGES, 0)
    calls, images = _calls(N_IMAGES, BATCH, padded=False)
    assert (r["stats"]["calls"], r["stats"]["images"]) == (calls, images)
    assert r["backend"]["shape"] == "dynamic"
    assert (r["top1"], r["top5"]) == (evaluated["cpu"]["top1"], evaluated["cpu"]["top5"])


def test_uint8_when_accepted_else_float16_same_counts_fewer_bytes(evaluated):
    f16, u8 = evaluated["static"], evaluated["static_uint8"]
    assert f16["backend"]["input_dtype"] == "float16"
    assert "uint8 input refused" in f16["backend"]["input_note"]
    assert u8["backend"]["input_dtype"] == "uint8"
    assert (u8["images"], u8["top1"], u8["top5"]) == (f16["images"], f16["top1"], f16["top5"])
    # what crosses the bus: pixels (uint8 is half of float16) -- the logits' D2H is the same
    assert f16["stats"]["h2d_bytes"] == 2 * u8["stats"]["h2d_bytes"]
    # every padded batch once, plus compute-only's one resident batch
    assert u8["stats"]["h2d_bytes"] == (N_IMAGES + 24 + BATCH) * SIDE * SIDE * 3


def test_run_bench_cli_hits_the_cache_of_an_earlier_process(evaluated, tiny, tmp_path):
    """run-bench in a new process, same model and options as the eval's static run: no compile."""
    log, js = str(tmp_path / "compiles.log"), str(tmp_path / "bench.json")
    env = {"PYTHONPATH": os.pathsep.join([FAKES, ROOT]), "FAKE_AIE_COMPILE_LOG": log}
    args = ["bin/run-bench", "--backend", "aie", "--ts", tiny["ts"], "--resize", str(SIDE), "--crop", str(SIDE),
            "--precision", "fp32", "--batch-sizes", str(BATCH), "--iterations", "3", "--warmup", "1",
            "--cache-dir", tiny["cache"], "--json", js]
    p = subprocess.run([sys.executable] + args, capture_output=True, text=True, timeout=240, cwd=ROOT,
                       env=dict(os.environ, **env))
    assert p.returncode == 0, p.stderr[-3000:]
    assert not os.path.exists(log), "compiled again although the cache holds this model"
    bench = json.load(open(js))
    assert set(bench) == {"results", "config"}
    [row] = bench["results"]
    assert set(row) == {"batch_size", "img_per_s", "latency_ms"} and set(row["latency_ms"]) == {"mean", "p50", "p99"}
    assert bench["config"]["backend_info"]["cache"] == "hit"
    assert "batch | mean ms" in p.stdout


UNIT = """
import atexit, json, os, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np, torch
import torch_aie
from torch_aie import _stand_in

out = {}
atexit.register(lambda: print("FINALIZED-AT-EXIT", _stand_in.FINALIZED, flush=True))  # runs last (LIFO)

from engine.backends import create_backend, resolve_auto
from engine.backends.base import BackendError
from engine.config import resolve_config
from engine.bench import run_bench

TS, CACHE, SIDE = sys.argv[1:4]
SIDE = int(SIDE)
out["auto"] = resolve_auto(verbose=False)

def cfg(**kw):
    base = dict(ts=TS, backend="aie", precision="fp32", cache_dir=CACHE, batch_size=8)
    base.update(kw)
    return resolve_config("tiny", {"resize": SIDE, "crop": SIDE}, **base)

def host_reference(pixels):
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.jit.load(TS)(x).numpy()

# 1. uint8 accepted / refused: the compiled graph's output equals host normalisation + model
rng = np.random.default_rng(0)
pixels = rng.integers(0, 256, (8, SIDE, SIDE, 3), dtype=np.uint8)
ref = host_reference(pixels)
for accept in (True, False):
    _stand_in.reset()
    _stand_in.ACCEPT_UINT8 = accept
    b = create_backend(cfg(use_cache=False))
    b.prepare(8)
    job = b.submit(pixels)
    job.copied()
    got = job.result()
    out["uint8" if accept else "float16"] = {"dtype": b.describe()["input_dtype"], "shape": list(got.shape),
                                             "max_diff": float(np.abs(got - ref).max()),
                                             "argmax_equal": bool((got.argmax(1) == ref.argmax(1)).all()),
                                             "compiled_input": _stand_in.LAST_COMPILE_KWARGS["inputs"][0].spec()}
    b.close()

# fp16 policy: rounded through half precision, still close
_stand_in.reset()
b = create_backend(cfg(precision="fp16", use_cache=False)); b.prepare(8)
job = b.submit(pixels); got = job.result()
out["fp16_max_diff"] = float(np.abs(got - ref).max())
out["fp16_policy"] = _stand_in.LAST_COMPILE_KWARGS["precision_policy"].name
b.close()

# 2. the compile cache: miss, hit, miss when an option changes, off with use_cache=False
_stand_in.reset()
seq = []
for kw in [{}, {}, {"optimization_level": 1}, {"optimization_level": 1}, {"soc_version": "Ascend910B"},
           {"precision": "fp16"}, {"shape": "dynamic"}, {"batch": 16}, {}, {"use_cache": False}]:
    kw = dict(kw)
    bs = kw.pop("batch", 8)
    before = _stand_in.COMPILE_CALLS
    b = create_backend(cfg(**kw))
    b.prepare(bs)
    seq.append([b.describe()["cache"], _stand_in.COMPILE_CALLS - before])
    b.close()
out["cache_seq"] = seq
out["cache_files"] = sorted(os.listdir(os.path.join(CACHE, "compiled")))
import json as _json
out["cache_specs"] = [_json.load(open(os.path.join(CACHE, "compiled", f)))["preprocess"]
                      for f in out["cache_files"] if f.endswith(".json")]

# 3. errors
def error(fn):
    try:
        fn()
    except BackendError as e:
        return str(e)
    return None
_stand_in.reset()
b = create_backend(cfg()); b.prepare(8)
out["err_short_static"] = error(lambda: b.submit(pixels[:5]))
out["err_inside_module"] = error(lambda: b._call(torch.zeros(3, SIDE, SIDE, 3, dtype=b.input_dtype).to("npu:0")))
b.close()
out["err_bf16"] = error(lambda: create_backend(cfg(precision="bf16")))
out["err_device"] = error(lambda: create_backend(cfg(device=3)))

# 4. the bench follows the simulated device time: dynamic, every batch size on one model
_stand_in.reset()
_stand_in.DEVICE_MS_PER_BATCH, _stand_in.DEVICE_MS_PER_IMAGE = 40.0, 10.0
# warmup=2: TorchScript's profiling executor optimises the graph for a new input shape on its
# second call (num_profiled_runs = 1), which takes 0.2-0.5 s more on torch 2.0.1 (here, on 2 cores)
bench = run_bench(cfg(shape="dynamic", use_cache=False), [1, 4, 8], warmup=2, iterations=3, log=open(os.devnull, "w"))
out["bench"] = bench["results"]
out["bench_compiles"] = _stand_in.COMPILE_CALLS
out["bench_backend"] = bench["config"]["backend_info"]
# the same bench with synchronize() forgotten reports impossible figures
from engine.backends import aie
synced = aie.timed_calls
aie.timed_calls = lambda call, sync, iterations, warmup: synced(call, lambda: None, iterations, warmup)
out["bench_unsynced"] = run_bench(cfg(shape="dynamic"), [8], warmup=2, iterations=3,
                                  log=open(os.devnull, "w"))["results"]
aie.timed_calls = synced
out["finalized_before_exit"] = _stand_in.FINALIZED
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def unit(tiny):
    code = UNIT.replace("sys.argv[1:4]", repr([tiny["ts"], os.path.join(tiny["dir"], "unit-cache"), str(SIDE)]))
    return run_script(code)


def test_compiled_graph_equals_host_normalisation_then_model(unit):
    u8, f16 = unit["uint8"], unit["float16"]
    assert u8["dtype"] == "uint8" and u8["compiled_input"]["dtype"] == "uint8"
    assert f16["dtype"] == "float16" and f16["compiled_input"]["dtype"] == "float16"
    for r in (u8, f16):
        assert r["shape"] == [8, 1000]
        assert r["compiled_input"]["shape"] == [8, SIDE, SIDE, 3]  # NHWC goes in; the graph permutes
        assert r["max_diff"] < 1e-4 and r["argmax_equal"]
    assert unit["fp16_policy"] == "FP16" and unit["fp16_max_diff"] < 0.1


def test_compile_cache_hit_on_second_run_miss_when_an_option_changes(unit):
    assert unit["cache_seq"] == [
        ["miss", 1], ["hit", 0],          # same options: loaded from disk, no compile
        ["miss", 1], ["hit", 0],          # optimization level 1
        ["miss", 1],                      # soc version
        ["miss", 1],                      # precision
        ["miss", 1],                      # dynamic shape
        ["miss", 1],                      # batch size
        ["hit", 0],                       # back to the first options
        ["off", 1],                       # --no-cache: compiled, nothing read
    ]
    assert sum(f.endswith(".ts") for f in unit["cache_files"]) == 6
    # the .json beside each compiled model keeps the preprocessing it was compiled for
    assert len(unit["cache_specs"]) == 6 and all(s["crop"] == SIDE and s["resize"] == SIDE for s in unit["cache_specs"])
    assert not [f for f in unit["cache_files"] if f.endswith(".partial")]


def test_errors_are_clear(unit):
    assert "static model compiled for batch 8 got 5 images" in unit["err_short_static"]
    assert "compiled model failed" in unit["err_inside_module"]  # torch.jit.Error, wrapped
    assert "bf16 is not supported on the aie backend" in unit["err_bf16"]
    assert "--device 3" in unit["err_device"]


def test_bench_figures_follow_the_simulated_device_time(unit):
    rows = {r["batch_size"]: r for r in unit["bench"]}
    assert sorted(rows) == [1, 4, 8]
    assert unit["bench_compiles"] == 1  # dynamic: one model for every batch size
    assert unit["bench_backend"]["shape"] == "dynamic" and unit["bench_backend"]["compiled_batch"] == 8
    for b, r in rows.items():
        device_ms = 40.0 + 10.0 * b
        assert r["latency_ms"]["p50"] >= device_ms * 0.98, (b, r)  # synchronised: the device time is paid
        assert r["latency_ms"]["mean"] < device_ms + 150, (b, r)
        assert r["img_per_s"] <= b * 1000.0 / (device_ms * 0.98)
    # without synchronize() the same bench reports a latency below the device time: caught
    [bad] = unit["bench_unsynced"]
    assert bad["latency_ms"]["p50"] < (40.0 + 10.0 * 8) * 0.98


def test_backend_auto_picks_aie_and_finalize_runs_once_at_exit(unit):
    assert unit["auto"] == "aie"
    assert unit["finalized_before_exit"] is False  # close() does not finalize: later backends still work
    assert "FINALIZED-AT-EXIT True" in unit["_stdout"]

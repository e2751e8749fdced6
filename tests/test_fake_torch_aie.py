"""Tests of the test-only torch_aie stand-in in tests/fakes (see shared/TORCH_AIE.md).

Importing the stand-in installs a fake "npu" device in the process for good, so nothing
here imports it into the pytest process: most tests send a snippet to one long-lived
worker subprocess (knobs and counters are reset before each snippet), and the tests that
need a pristine process (finalize, environment knobs, loading a saved module) start their
own. Each snippet runs with PRELUDE's helpers and fails the test by raising.
"""
import json
import os
import queue
import subprocess
import sys
import textwrap
import threading

import pytest

FAKES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakes")
TIMEOUT_S = 180

PRELUDE = '''
import time, warnings
warnings.simplefilter("ignore")
import torch, torch_aie
from torch_aie import _stand_in, npu

def raises(exc, fn, *args, **kwargs):
    match = kwargs.pop("match", None)
    try:
        fn(*args, **kwargs)
    except exc as e:
        assert match is None or match in str(e), "%r not in %r" % (match, str(e))
        return e
    raise AssertionError("%s not raised" % (exc,))

def tiny_ts():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    return m, torch.jit.trace(m, torch.ones(1, 3, 8, 8))

def compiled(*inputs, **kw):
    m, ts = tiny_ts()
    return m, torch_aie.compile(ts, inputs=list(inputs), **kw)

def timed(fn, *args):
    t = time.monotonic()
    out = fn(*args)
    return out, time.monotonic() - t
'''

WORKER = r'''
import json, os, sys, traceback
out = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # snippets' prints go to stderr, replies to the saved stdout
try:
    import torch_aie
except ImportError as exc:
    out.write(json.dumps({"skip": str(exc)}) + "\n"); out.flush(); sys.exit(0)
from torch_aie import _stand_in
out.write(json.dumps({"ready": True}) + "\n"); out.flush()
for line in sys.stdin:
    _stand_in.reset()
    ns = {"__name__": "__snippet__"}
    try:
        exec(compile(json.loads(line), "<snippet>", "exec"), ns)
        reply = {"ok": True, "result": ns.get("RESULT")}
    except BaseException:
        reply = {"ok": False, "error": traceback.format_exc()}
    out.write(json.dumps(reply, default=repr) + "\n"); out.flush()
'''


def _env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = FAKES + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FAKE_AIE_COMPILE_LOG", None)
    env.update(extra or {})
    return env


class _Worker(object):
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=_env(), text=True)
        self.replies = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.first = self._reply()

    def _pump(self):
        for line in self.proc.stdout:
            self.replies.put(json.loads(line))
        self.replies.put(None)

    def _reply(self):
        try:
            reply = self.replies.get(timeout=TIMEOUT_S)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError("stand-in worker timed out")
        if reply is None:
            raise AssertionError("stand-in worker died (exit %s)" % self.proc.wait())
        return reply

    def run(self, code):
        self.proc.stdin.write(json.dumps(PRELUDE + textwrap.dedent(code)) + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        if not reply["ok"]:
            pytest.fail("snippet failed in the stand-in worker:\n" + reply["error"])
        return reply["result"]

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def aie():
    worker = _Worker()
    if "skip" in worker.first:
        worker.close()
        pytest.skip(worker.first["skip"])
    yield worker
    worker.close()


def run_fresh(code, env=None, prelude=True):
    """Run ``code`` in a new interpreter with tests/fakes on PYTHONPATH; return stdout."""
    source = (PRELUDE if prelude else "") + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", source], env=_env(env), capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    if "the torch_aie stand-in needs torch.utils.rename_privateuse1_backend" in proc.stderr:
        pytest.skip("torch older than 2.0: no way to name a device 'npu'")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# 1. names and signatures ------------------------------------------------------------------

def test_signatures_and_enums(aie):
    aie.run('''
    import inspect
    from torch_aie import _enums
    p = inspect.signature(torch_aie.compile).parameters
    assert list(p) == ["module", "inputs", "precision_policy", "soc_version",
                       "optimization_level", "allow_tensor_replace_int",
                       "truncate_long_and_double", "require_full_compilation",
                       "min_block_size", "torch_executed_ops"], list(p)
    defaults = {k: v.default for k, v in p.items()}
    assert defaults["precision_policy"] is torch_aie.PrecisionPolicy.FP16
    assert defaults["soc_version"] == "Ascend310P3"
    assert defaults["optimization_level"] == 0
    assert defaults["allow_tensor_replace_int"] is False
    assert defaults["truncate_long_and_double"] is True
    assert defaults["require_full_compilation"] is False
    assert defaults["min_block_size"] == 3
    assert defaults["torch_executed_ops"] == []
    p = inspect.signature(torch_aie.Input).parameters
    assert list(p) == ["shape", "dtype", "format", "min_shape", "max_shape"]
    assert p["dtype"].default is torch.float32
    assert p["format"].default is torch_aie.TensorFormat.NCHW
    assert list(inspect.signature(torch_aie.set_device).parameters) == ["device_id"]
    p = inspect.signature(torch_aie.export_engine).parameters
    assert p["method_name"].default == "forward" and "path" in p and "inputs" in p
    assert inspect.signature(npu.Stream).parameters["device"].default == "npu:0"
    assert _enums.PrecisionPolicy is torch_aie.PrecisionPolicy
    for name in ("FP16", "FP32", "PREF_FP32", "PREF_FP16"):
        assert getattr(_enums.PrecisionPolicy, name) is getattr(torch_aie.PrecisionPolicy, name)
    for name in ("NCHW", "ND"):
        getattr(torch_aie.TensorFormat, name)
    for name in ("FLOAT", "FLOAT16", "INT32", "INT64", "BOOL"):
        getattr(torch_aie.dtype, name)
    for name in ("npu", "finalize", "export_engine", "compile", "set_device", "Input"):
        assert hasattr(torch_aie, name), name
    ''')


def test_no_events_and_no_undocumented_sync(aie):
    aie.run('''
    for mod in (torch_aie, torch_aie.npu):
        assert not hasattr(mod, "Event")
    assert not hasattr(npu, "synchronize")  # TORCH_AIE.md lists only Stream.synchronize
    s = npu.Stream()
    for name in ("record_event", "wait_event", "wait_stream", "query"):
        assert not hasattr(s, name), name
    # torch.npu exists where the stand-in is a PrivateUse1 Python backend (torch >= 2.1), which
    # registers a device module; on torch 2.0 it does not exist at all
    tnpu = getattr(torch, "npu", None)
    assert tnpu is not None or torch.__version__ < "2.1", torch.__version__
    assert not hasattr(tnpu, "Event") and not hasattr(tnpu, "synchronize")
    ''')


def test_set_device(aie):
    aie.run('''
    assert _stand_in.CURRENT_DEVICE == 0
    torch_aie.set_device(0)
    raises(RuntimeError, torch_aie.set_device, 1)
    raises(RuntimeError, torch_aie.set_device, -1)
    raises(TypeError, torch_aie.set_device, "npu:0")
    raises(TypeError, torch_aie.set_device, True)
    assert _stand_in.CURRENT_DEVICE == 0
    ''')


# 2. validation ------------------------------------------------------------------------------

def test_input_validation(aie):
    aie.run('''
    I = torch_aie.Input
    assert I((64, 3, 224, 224)).shape == (64, 3, 224, 224)
    assert I(shape=[2, 3], dtype=torch_aie.dtype.INT64, format=torch_aie.TensorFormat.ND).dtype == torch.int64
    assert I((1, 3), dtype=torch_aie.dtype.FLOAT16).dtype == torch.float16
    r = I(min_shape=(1, 3, 224, 224), max_shape=(32, 3, 224, 224))
    assert (r.min_shape, r.max_shape, r.shape) == ((1, 3, 224, 224), (32, 3, 224, 224), None)
    raises(ValueError, I, min_shape=(1, 3), max_shape=(32, 3, 224), match="rank")
    raises(ValueError, I, min_shape=(8, 3), max_shape=(4, 3), match="below")
    raises(ValueError, I, min_shape=(1,) * 9, max_shape=(2,) * 9, match="rank")
    raises(ValueError, I, (1, 3), min_shape=(1, 3), max_shape=(2, 3))
    raises(ValueError, I, min_shape=(1, 3))
    raises(ValueError, I)
    raises(ValueError, I, (0, 3))
    raises(TypeError, I, (1, 3), dtype=torch.float64)
    raises(TypeError, I, (1, 3), format="NCHW")
    # uint8 is undocumented: refused (and dtype.UINT8 absent) unless ACCEPT_UINT8
    raises(TypeError, I, (1, 3), dtype=torch.uint8, match="uint8")
    assert not hasattr(torch_aie.dtype, "UINT8")
    _stand_in.ACCEPT_UINT8 = True
    assert I((1, 3), dtype=torch.uint8).dtype == torch.uint8
    assert I((1, 3), dtype=torch_aie.dtype.UINT8).dtype == torch.uint8
    ''')


def test_compile_validation_and_counters(aie):
    aie.run('''
    m, ts = tiny_ts()
    inp = [torch_aie.Input((4, 3, 8, 8))]
    raises(TypeError, torch_aie.compile, m, inputs=inp, match="TorchScript")
    raises(ValueError, torch_aie.compile, ts, inputs=inp, optimization_level=3)
    raises(ValueError, torch_aie.compile, ts, inputs=inp, optimization_level=-1)
    raises(TypeError, torch_aie.compile, ts, inputs=inp, precision_policy="FP16")
    raises(ValueError, torch_aie.compile, ts, inputs=inp, soc_version="Tesla")
    raises(ValueError, torch_aie.compile, ts)
    raises(TypeError, torch_aie.compile, ts, inputs=[(4, 3, 8, 8)])
    raises(TypeError, torch_aie.compile, ts, inputs=inp, min_block_size=1, torch_executed_ops="x")
    assert _stand_in.COMPILE_CALLS == 0
    scripted = torch.jit.script(m)
    for level in (0, 1, 2):
        c = torch_aie.compile(scripted, inputs=inp, optimization_level=level,
                              precision_policy=torch_aie._enums.PrecisionPolicy.FP32)
        assert isinstance(c, torch.jit.ScriptModule)
    assert _stand_in.COMPILE_CALLS == 3
    kw = _stand_in.LAST_COMPILE_KWARGS
    assert kw["optimization_level"] == 2 and kw["soc_version"] == "Ascend310P3"
    assert kw["precision_policy"] is torch_aie.PrecisionPolicy.FP32 and kw["min_block_size"] == 3
    ''')


# 3. the compiled module ---------------------------------------------------------------------

def test_static_batch_rejects_other_batches(aie):
    aie.run('''
    m, c = compiled(torch_aie.Input((64, 3, 8, 8)))
    ok = c(torch.randn(64, 3, 8, 8).to("npu:0"))
    assert ok.device.type == "npu" and tuple(ok.shape) == (64, 4)
    e = raises(torch.jit.Error, c, torch.randn(63, 3, 8, 8).to("npu:0"), match="(63, 3, 8, 8)")
    assert not isinstance(e, RuntimeError)  # errors inside TorchScript are not RuntimeErrors
    raises(torch.jit.Error, c, torch.randn(64, 3, 8, 9).to("npu:0"))
    ''')


def test_dynamic_range_and_gears(aie):
    aie.run('''
    m, c = compiled(torch_aie.Input(min_shape=(1, 3, 8, 8), max_shape=(32, 3, 8, 8)))
    for b in (1, 17, 32):
        assert tuple(c(torch.randn(b, 3, 8, 8).to("npu")).shape) == (b, 4)
    raises(torch.jit.Error, c, torch.randn(33, 3, 8, 8).to("npu"), match="matches none")
    m, g = compiled([torch_aie.Input((1, 3, 8, 8))], [torch_aie.Input((8, 3, 8, 8))])
    for b in (1, 8):
        assert tuple(g(torch.randn(b, 3, 8, 8).to("npu")).shape) == (b, 4)
    raises(torch.jit.Error, g, torch.randn(4, 3, 8, 8).to("npu"))
    ''')


def test_rejects_cpu_input_and_other_dtype(aie):
    aie.run('''
    m, c = compiled(torch_aie.Input((2, 3, 8, 8)))
    raises(torch.jit.Error, c, torch.randn(2, 3, 8, 8), match="npu tensors")
    raises(torch.jit.Error, c, torch.randn(2, 3, 8, 8).half().to("npu"), match="dtype")
    m, h = compiled(torch_aie.Input((2, 3, 8, 8), dtype=torch_aie.dtype.FLOAT16))
    raises(torch.jit.Error, h, torch.randn(2, 3, 8, 8).to("npu"), match="dtype")
    assert h(torch.randn(2, 3, 8, 8).half().to("npu")).to("cpu").dtype == torch.float32
    # with ACCEPT_UINT8, a module that normalises inside takes uint8 images as they are
    _stand_in.ACCEPT_UINT8 = True
    class Norm(torch.nn.Module):
        def forward(self, u):
            return u.float().mean((2, 3)) / 255
    ts = torch.jit.trace(Norm(), torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    u8 = torch_aie.compile(ts, inputs=[torch_aie.Input((2, 3, 8, 8), dtype=torch_aie.dtype.UINT8)])
    img = torch.full((2, 3, 8, 8), 51, dtype=torch.uint8)
    assert torch.allclose(u8(img.to("npu")).to("cpu"), torch.full((2, 3), 0.2), atol=1e-3)  # FP16
    raises(torch.jit.Error, u8, img.float().to("npu"), match="dtype")
    ''')


def test_fp16_policies_round_through_half(aie):
    aie.run('''
    x = torch.randn(8, 3, 8, 8) * 3
    inp = torch_aie.Input((8, 3, 8, 8))
    results = {}
    for policy in torch_aie.PrecisionPolicy:
        m, c = compiled(inp, precision_policy=policy)
        results[policy.name] = c(x.to("npu")).to("cpu")
    with torch.no_grad():
        ref = m(x)
    assert torch.equal(results["FP32"], ref) and torch.equal(results["PREF_FP32"], ref)
    for name in ("FP16", "PREF_FP16"):
        y = results[name]
        assert torch.equal(y, y.half().float())  # outputs are float16 values
        assert not torch.equal(y, ref) and torch.allclose(y, ref, atol=2e-2, rtol=1e-2)
    ''')


def test_save_and_jit_load_round_trip(aie, tmp_path):
    path = str(tmp_path / "compiled.ts")
    ref = str(tmp_path / "ref.pt")
    aie.run('''
    m, c = compiled(torch_aie.Input((4, 3, 8, 8)))
    x = torch.randn(4, 3, 8, 8)
    c.save(%r)
    torch.save({"x": x, "y": c(x.to("npu")).to("cpu")}, %r)
    ''' % (path, ref))
    out = run_fresh('''
    import warnings, torch
    warnings.simplefilter("ignore")
    try:
        torch.jit.load(%r)  # the real one also needs `import torch_aie` first
        raise SystemExit("loaded without torch_aie")
    except RuntimeError as e:
        print("refused without torch_aie")
    import torch_aie
    torch_aie.set_device(0)
    c = torch.jit.load(%r)
    d = torch.load(%r)
    assert torch.equal(c(d["x"].to("npu:0")).to("cpu"), d["y"])
    try:
        c(torch.randn(3, 3, 8, 8).to("npu:0"))
        raise SystemExit("batch 3 accepted")
    except torch.jit.Error:
        pass
    print("round trip ok")
    ''' % (path, path, ref), prelude=False)
    assert "refused without torch_aie" in out and "round trip ok" in out


def test_export_engine(aie, tmp_path):
    path = str(tmp_path / "x.om")
    aie.run('''
    m, ts = tiny_ts()
    assert torch_aie.export_engine(ts, method_name="forward", path=%r,
                                   inputs=[torch_aie.Input((1, 3, 8, 8))]) == %r
    raises(ValueError, torch_aie.export_engine, ts, method_name="nope", path=%r,
           inputs=[torch_aie.Input((1, 3, 8, 8))])
    raises(TypeError, torch_aie.export_engine, m, path=%r, inputs=[torch_aie.Input((1, 3, 8, 8))])
    assert _stand_in.EXPORT_CALLS == 1 and _stand_in.COMPILE_CALLS == 0
    ''' % (path, path, path, path))
    assert os.path.getsize(path) > 0


# 4. asynchrony ------------------------------------------------------------------------------

def test_calls_return_at_once_and_synchronize_pays(aie):
    aie.run('''
    m, c = compiled(torch_aie.Input((16, 3, 8, 8)))
    x = torch.randn(16, 3, 8, 8).to("npu")
    c(x).to("cpu")  # warm up
    _stand_in.DEVICE_MS_PER_BATCH, _stand_in.DEVICE_MS_PER_IMAGE = 100.0, 25.0  # 500 ms a call
    s = npu.current_stream()
    s.synchronize()
    # forgetting to synchronise: 3 calls "take" far less than their 1.5 s of device time
    _, t_calls = timed(lambda: [c(x) for _ in range(3)])
    assert t_calls < 0.6, t_calls
    _, t_sync = timed(s.synchronize)
    assert t_sync + t_calls > 1.45 and t_sync > 0.9, (t_calls, t_sync)
    _, t_idle = timed(s.synchronize)
    assert t_idle < 0.05
    # .to("cpu") without an explicit synchronize waits for the call too
    y = c(x)
    _, t_d2h = timed(y.to, "cpu")
    assert t_d2h > 0.45, t_d2h
    with torch.inference_mode():
        _, t_inf = timed(c, x)
    assert t_inf < 0.35, t_inf
    assert _stand_in.STATS["calls"] == 6 and _stand_in.STATS["images"] == 96
    ''')


def test_copy_time_pinned_and_pageable(aie):
    aie.run('''
    _stand_in.H2D_GBPS = _stand_in.D2H_GBPS = 0.01  # 4 MB -> 0.4 s
    x = torch.randn(1024, 1024)
    s = npu.current_stream()
    _, t = timed(x.to, "npu:0")
    assert t > 0.35, t                            # blocking copy
    _, t = timed(lambda: x.to("npu:0", non_blocking=True))
    assert t > 0.35, t                            # pageable: the host waits for the copy
    _stand_in.EMULATE_PINNED = True
    p = x.pin_memory()
    assert p.is_pinned() and p[:10].is_pinned() and not x.is_pinned()
    d, t = timed(lambda: p.to("npu:0", non_blocking=True))
    assert t < 0.25, t                             # pinned: returns at once ...
    _, t = timed(s.synchronize)
    assert t > 0.3, t                             # ... and the stream pays
    assert torch.equal(d.to("cpu"), x)
    assert _stand_in.STATS["h2d_bytes"] == 3 * x.numel() * 4
    ''')


def test_copies_overlap_compute_only_on_other_streams(aie):
    aie.run('''
    m, c = compiled(torch_aie.Input((4, 3, 64, 64)))
    _stand_in.EMULATE_PINNED = True
    batches = [torch.randn(4, 3, 64, 64).pin_memory() for _ in range(3)]
    for b in batches * 2:  # warm up TorchScript's profiling executor
        c(b.to("npu")).to("cpu")
    _stand_in.H2D_GBPS = 4 * 3 * 64 * 64 * 4 / 0.200 / 1e9  # one batch: 200 ms
    _stand_in.DEVICE_MS_PER_BATCH, _stand_in.DEVICE_MS_PER_IMAGE = 200.0, 0.0
    copy_s, run_s = npu.Stream(), npu.Stream()

    def pipelined():  # copy batch i+1 while batch i runs: 4 x 200 ms
        t0 = time.monotonic()
        with npu.stream(copy_s):
            nxt = batches[0].to("npu", non_blocking=True)
        for i in range(3):
            copy_s.synchronize()
            cur = nxt
            with npu.stream(run_s):
                c(cur)
            if i + 1 < 3:
                with npu.stream(copy_s):
                    nxt = batches[i + 1].to("npu", non_blocking=True)
        run_s.synchronize()
        return time.monotonic() - t0

    def serial():  # everything on one stream: copies and calls serialise: 6 x 200 ms
        t0 = time.monotonic()
        for b in batches:
            c(b.to("npu", non_blocking=True))
        npu.current_stream().synchronize()
        return time.monotonic() - t0

    best = min(pipelined(), pipelined(), pipelined())  # host stalls only add time
    t_serial = serial()
    assert t_serial > 1.15 and best < 1.0, (best, t_serial)
    RESULT = (best, t_serial)
    ''')


def test_cross_stream_use_needs_synchronize(aie):
    aie.run('''
    m, c = compiled(torch_aie.Input((2, 3, 8, 8)))
    _stand_in.EMULATE_PINNED = True
    _stand_in.DEVICE_MS_PER_BATCH = 50.0
    a, b = npu.Stream(), npu.Stream()
    with npu.stream(a):
        x = torch.randn(2, 3, 8, 8).pin_memory().to("npu", non_blocking=True)
    with npu.stream(b):
        raises(torch.jit.Error, c, x, match="no events")  # a was never synchronised
    a.synchronize()
    with npu.stream(b):
        y = c(x)
    raises(RuntimeError, y.to, "cpu", match="synchronize")  # default stream reads b's output
    with npu.stream(a):  # overwriting x while b may still read it
        raises(RuntimeError, x.copy_, torch.zeros(2, 3, 8, 8), match="still being read")
    b.synchronize()
    assert y.to("cpu").shape == (2, 4)
    with npu.stream(a):
        x.copy_(torch.zeros(2, 3, 8, 8))
    ''')


def test_non_blocking_d2h_is_garbage_until_synchronize(aie):
    aie.run('''
    m, c = compiled(torch_aie.Input((2, 3, 8, 8)))
    x = torch.randn(2, 3, 8, 8)
    y = c(x.to("npu"))
    out = y.to("cpu", non_blocking=True)
    assert torch.isnan(out).all()          # read before synchronize: garbage
    npu.current_stream().synchronize()
    assert torch.equal(out, y.to("cpu")) and not torch.isnan(out).any()
    idx = torch.arange(6).reshape(2, 3).to("npu")
    host = torch.empty(2, 3, dtype=torch.int64)
    _stand_in.EMULATE_PINNED = True
    host = host.pin_memory()
    host.copy_(idx, non_blocking=True)
    assert (host == torch.iinfo(torch.int64).max).all()
    npu.current_stream().synchronize()
    assert host.tolist() == [[0, 1, 2], [3, 4, 5]]
    ''')


def test_streams_api(aie):
    aie.run('''
    d = npu.default_stream()
    assert npu.current_stream() is d and npu.default_stream("npu:0") is d
    s = npu.Stream("npu:0")
    assert s.device == torch.device("npu:0") and npu.Stream(device=torch.device("npu:0"))
    raises(RuntimeError, npu.Stream, "npu:1")
    with npu.stream(s) as entered:
        assert entered is s and npu.current_stream() is s
        with npu.stream(None):
            assert npu.current_stream() is s
    assert npu.current_stream() is d
    npu.set_stream(s)
    assert npu.current_stream() is s
    npu.set_stream(d)
    raises(TypeError, npu.set_stream, "npu:0")
    s.synchronize()
    import threading
    seen = []
    with npu.stream(s):  # the current stream is per thread
        t = threading.Thread(target=lambda: seen.append(npu.current_stream()))
        t.start(); t.join()
    assert seen == [d]
    ''')


# 5. npu tensors allow copies only -----------------------------------------------------------

def test_npu_tensors_allow_only_copies(aie):
    aie.run('''
    x = torch.arange(12.).reshape(3, 4)
    n = x.to("npu:0")
    assert n.device == torch.device("npu:0") and n.is_npu and n.shape == (3, 4)
    for op in (lambda: n + 1, lambda: n.sum(), lambda: n.argmax(1), lambda: n[0],
               lambda: torch.cat([n, n]), lambda: n == n, lambda: n.topk(2)):
        raises(NotImplementedError, op)
    raises(TypeError, n.numpy)
    assert torch.equal(n.to("cpu"), x) and torch.equal(n.cpu(), x)
    assert torch.equal(n.view(12).to("cpu"), x.view(12))
    assert n.to(torch.float16).to("cpu").dtype == torch.float16
    h = torch.empty(3, 4, device="npu")
    h.copy_(n)
    dst = torch.empty(3, 4)
    dst.copy_(h)
    assert torch.equal(dst, x) and torch.equal(x.t().to("npu").cpu(), x.t())
    assert n.detach().to("cpu").sum() == x.sum()
    raises(RuntimeError, x.to, "npu:1")
    ''')


def test_pinned_memory_behaviour(aie):
    aie.run('''
    from torch.utils.data import DataLoader, TensorDataset
    ds = TensorDataset(torch.ones(8, 3))
    raises(Exception, torch.ones(4).pin_memory)          # no pinned allocator for npu
    raises(Exception, torch.empty, 4, pin_memory=True)
    assert not torch.ones(4).is_pinned()
    _stand_in.EMULATE_PINNED = True
    p = torch.ones(4).pin_memory()
    assert p.is_pinned() and p.pin_memory() is p
    batch = next(iter(DataLoader(ds, batch_size=4, pin_memory=True)))[0]
    if torch.__version__ < "2.1":  # torch 2.0's DataLoader pins only where CUDA is available,
        assert not batch.is_pinned()  # or for a pin_memory_device it is given
        batch = next(iter(DataLoader(ds, batch_size=4, pin_memory=True, pin_memory_device="npu")))[0]
    assert batch.is_pinned()
    raises(Exception, torch.empty, 4, pin_memory=True)   # factories still refuse
    ''')


# fresh processes ----------------------------------------------------------------------------

def test_finalize_stops_everything():
    out = run_fresh('''
    m, c = compiled(torch_aie.Input((2, 3, 8, 8)))
    x = torch.randn(2, 3, 8, 8).to("npu")
    s = npu.Stream()
    torch_aie.finalize()
    for call in (lambda: torch_aie.set_device(0), lambda: torch_aie.Input((1, 3)),
                 lambda: torch_aie.compile(tiny_ts()[1], inputs=[torch_aie.Input((1, 3, 8, 8))]),
                 npu.Stream, s.synchronize, npu.current_stream, torch_aie.finalize,
                 lambda: torch.ones(2).to("npu"), lambda: x.to("cpu"),
                 lambda: torch_aie.export_engine(tiny_ts()[1], path="x.om",
                                                 inputs=[torch_aie.Input((1, 3, 8, 8))])):
        raises(RuntimeError, call, match="finalize")
    raises(torch.jit.Error, c, x, match="finalize")
    print("finalized")
    ''')
    assert "finalized" in out


def test_environment_knobs_and_compile_log(tmp_path):
    log = str(tmp_path / "compiles.jsonl")
    out = run_fresh('''
    assert (_stand_in.DEVICE_MS_PER_BATCH, _stand_in.DEVICE_MS_PER_IMAGE) == (7.0, 0.5)
    assert (_stand_in.H2D_GBPS, _stand_in.D2H_GBPS) == (3.0, 4.0)
    assert _stand_in.ACCEPT_UINT8 and _stand_in.EMULATE_PINNED
    assert torch_aie.Input((1, 3), dtype=torch_aie.dtype.UINT8).dtype == torch.uint8
    assert torch.ones(2).pin_memory().is_pinned()
    _, t = timed(compiled, torch_aie.Input((1, 3, 8, 8)))
    assert t >= 0.2
    _stand_in.DEVICE_MS_PER_BATCH = 1.0
    _stand_in.reset()
    assert _stand_in.DEVICE_MS_PER_BATCH == 7.0 and _stand_in.COMPILE_CALLS == 0
    print("knobs ok")
    ''', env={"FAKE_AIE_BATCH_MS": "7", "FAKE_AIE_IMAGE_MS": "0.5", "FAKE_AIE_H2D_GBPS": "3",
              "FAKE_AIE_D2H_GBPS": "4", "FAKE_AIE_ACCEPT_UINT8": "1", "FAKE_AIE_PINNED": "1",
              "FAKE_AIE_COMPILE_S": "0.2", "FAKE_AIE_COMPILE_LOG": log})
    assert "knobs ok" in out
    with open(log) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 1 and lines[0]["precision_policy"] == "FP16"
    assert lines[0]["inputs"] == [{"dtype": "float32", "format": "NCHW", "shape": [1, 3, 8, 8]}]

"""What ``torch_aie.compile`` returns in the stand-in (test-only).

A genuine TorchScript module (``torch.jit.script`` of :class:`CompiledModule`) that wraps a
copy of the user's TorchScript module between three custom ops in the ``aie_stand_in``
namespace. Its settings live in the string attribute ``aie_spec`` (JSON), so
``compiled.save(path)`` writes an ordinary TorchScript file and ``torch.jit.load(path)``
returns an equivalent compiled module -- provided ``import torch_aie`` ran first to
register the ops, as with the real package. Nothing global is patched for this.

Reproduces TORCH_AIE.md stand-in facts 3 and 4: the module takes and returns npu tensors;
rejects a cpu input, a shape outside its static shape / range / gears, a dtype other than
its Input's; rounds through float16 under FP16/PREF_FP16 (weights at compile time, input
and output at each call); returns at once and charges ``DEVICE_MS_PER_BATCH +
DEVICE_MS_PER_IMAGE * dim0`` ms to the current stream. Rejections are ``raise``d inside the
TorchScript code, so they arrive as ``torch.jit.Error`` -- not a ``RuntimeError`` -- which
is how errors inside TorchScript reach Python.

Stand-in limits: one input tensor, one output tensor.
"""
import json
import threading
import time

import torch

from . import _stand_in, _device, _enums, npu

_LIB = torch.library.Library("aie_stand_in", "DEF")
_LIB.define("check(Tensor x, str spec) -> str")
_LIB.define("enter(Tensor x, str spec) -> Tensor")
_LIB.define("leave(Tensor y, Tensor x, str spec) -> Tensor")
_CALL = threading.local()


def _shape_ok(shape, alt):
    if "shape" in alt:
        return list(shape) == alt["shape"]
    return len(shape) == len(alt["min"]) and all(
        lo <= s <= hi for s, lo, hi in zip(shape, alt["min"], alt["max"]))


def _describe(alt):
    if "shape" in alt:
        return "%s %s" % (tuple(alt["shape"]), alt["dtype"])
    return "%s..%s %s" % (tuple(alt["min"]), tuple(alt["max"]), alt["dtype"])


def _check(x, spec):
    if _stand_in.FINALIZED:
        return "torch_aie.finalize() was called; compiled modules no longer run"
    if x.device.type != "npu":
        return ("compiled torch_aie module got a %s tensor; it takes npu tensors "
                "(x.to('npu:0') first)" % x.device.type)
    alts = json.loads(spec)["inputs"]
    dtype = str(x.dtype).replace("torch.", "")
    if not any(_shape_ok(x.shape, a) for a in alts):
        return "input shape %s matches none of the compiled inputs: %s" % (
            tuple(x.shape), ", ".join(_describe(a) for a in alts))
    if not any(_shape_ok(x.shape, a) and a["dtype"] == dtype for a in alts):
        return "input dtype %s differs from the compiled input's: %s" % (
            dtype, ", ".join(_describe(a) for a in alts))
    stream = npu.current_stream()
    try:
        npu._check_read(_device._buffer(x).hazards, stream, "compiled module input")
    except RuntimeError as exc:
        return str(exc)
    return ""


def _enter(x, spec):
    cfg = json.loads(spec)
    data = _device._data(x)
    _CALL.start = time.monotonic()
    if data.is_floating_point():
        if cfg["half"]:
            data = data.half()
        if cfg["cpu_dtype"]:
            data = data.to(getattr(torch, cfg["cpu_dtype"]))
    return data.clone()


def _leave(y, x, spec):
    """``y``: the inner module's cpu output for the npu input ``x`` -> the npu output."""
    cfg = json.loads(spec)
    if cfg["half"] and y.is_floating_point():
        y = y.half().to(y.dtype)
    batch = x.shape[0] if x.dim() else 1
    stream = npu.current_stream()
    ms = _stand_in.DEVICE_MS_PER_BATCH + _stand_in.DEVICE_MS_PER_IMAGE * batch
    seq, _ = npu._enqueue(stream, "compute", ms / 1000.0, not_before=_CALL.start)
    npu._did_read(_device._buffer(x).hazards, stream, seq)
    out = _device._new_npu(y.contiguous().clone())
    npu._did_write(_device._buffer(out).hazards, stream, seq)
    _stand_in.STATS["calls"] += 1
    _stand_in.STATS["images"] += batch
    return out


_LIB.impl("check", _check, "CompositeExplicitAutograd")
_LIB.impl("enter", _enter, "CompositeExplicitAutograd")
_LIB.impl("leave", _leave, "CompositeExplicitAutograd")
if _device._MODE[0] == "subclass":
    # torch 2.0's npu tensors (wrapper subclasses on PrivateUse1) stop at AutogradPrivateUse1,
    # which CompositeExplicitAutograd does not cover there; each op takes the npu input, which
    # has a Python object, so the kernel runs with it (not "hermetically", see _device)
    # (and under torch.inference_mode, with no autograd key, at the tensor's __torch_dispatch__)
    for _name, _fn in (("check", _check), ("enter", _enter), ("leave", _leave)):
        _LIB.impl(_name, _fn, "AutogradPrivateUse1")
        _device.PASS_THROUGH["aie_stand_in::" + _name] = _fn


class CompiledModule(torch.nn.Module):
    aie_spec: str

    def __init__(self, inner, spec):
        super().__init__()
        self.inner = inner
        self.aie_spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        msg = torch.ops.aie_stand_in.check(x, self.aie_spec)
        if msg != "":
            raise RuntimeError(msg)
        y = self.inner(torch.ops.aie_stand_in.enter(x, self.aie_spec))
        return torch.ops.aie_stand_in.leave(y, x, self.aie_spec)


def build(module, alternatives, settings):
    """Script a CompiledModule around a copy of ``module`` (rounded to fp16 if asked)."""
    import io
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    buf.seek(0)
    inner = torch.jit.load(buf, map_location="cpu")
    inner.eval()
    half = settings["precision_policy"] in _enums.HALF_POLICIES
    cpu_dtype = None
    with torch.no_grad():
        for t in list(inner.parameters()) + list(inner.buffers()):
            t.requires_grad_(False)
            if t.is_floating_point():
                cpu_dtype = cpu_dtype or str(t.dtype).replace("torch.", "")
                if half:
                    t.copy_(t.half().to(t.dtype))
    spec = {
        "inputs": [a.spec() for a in alternatives],
        "half": half,
        "cpu_dtype": cpu_dtype,
        "precision_policy": settings["precision_policy"].name,
        "soc_version": settings["soc_version"],
        "optimization_level": settings["optimization_level"],
    }
    try:
        return torch.jit.script(CompiledModule(inner, json.dumps(spec)))
    except Exception as exc:
        raise NotImplementedError(
            "the torch_aie stand-in compiles modules whose forward takes one Tensor and "
            "returns one Tensor: %s" % exc)

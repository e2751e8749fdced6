"""A test-only stand-in for ``torch_aie`` (Huawei Ascend torch_aie / MindIE-Torch).

Not the real package, and never imported by the engine itself: tests make it importable
as ``torch_aie`` by putting ``tests/fakes`` first on ``sys.path`` (``PYTHONPATH`` for a
subprocess). It reproduces the facts of ``shared/TORCH_AIE.md``, section "What a stand-in
for tests must reproduce":

1. names and signatures: ``set_device``, ``Input``, ``dtype``, ``TensorFormat``,
   ``PrecisionPolicy`` (also ``_enums.PrecisionPolicy``), ``compile`` with every keyword
   and default, ``export_engine``, ``finalize``, ``npu.Stream/stream/default_stream/
   current_stream/set_stream``, and no ``Event`` (:mod:`.npu`);
2. validation: ``compile`` wants a ScriptModule, ``optimization_level`` in {0, 1, 2},
   ranges of equal rank (<= 8) with max >= min, and every call after ``finalize()`` fails;
3. compiled modules (:mod:`._compiled`): npu tensors only, static shape / range / gears,
   Input dtype, fp16 rounding, ``save`` + ``torch.jit.load`` round trip;
4. asynchrony: simulated device time is paid in ``Stream.synchronize()`` (:mod:`.npu`);
5. an "npu" device whose tensors allow copies only (:mod:`._device`).

Importing this package installs the fake "npu" device in the process, for good (a
PrivateUse1 backend cannot be removed), so use it in a subprocess or a dedicated process.
Knobs and counters: :mod:`._stand_in`. Exception types are not documented for the real
package; the stand-in raises TypeError for wrong types, ValueError for bad values and
RuntimeError for state errors -- tests of the engine should not depend on them.
"""
import json
import os
import time

import torch

from . import _stand_in, _enums, npu, _device

_device.install()

from . import _compiled  # noqa: E402  (needs the npu device)
from ._enums import PrecisionPolicy, TensorFormat, dtype  # noqa: E402

__all__ = ["set_device", "Input", "dtype", "TensorFormat", "PrecisionPolicy", "compile",
           "export_engine", "finalize", "npu"]

_MAX_RANK = 8


def set_device(device_id):
    """Select the NPU (``int``; the stand-in has ``FAKE_AIE_DEVICES`` devices, 1 by default; default 0)."""
    _stand_in.check_alive("torch_aie.set_device")
    if not isinstance(device_id, int) or isinstance(device_id, bool):
        raise TypeError("set_device expects an int device id, got %r" % (device_id,))
    count = _stand_in.DEVICES
    if not 0 <= device_id < count:
        raise RuntimeError("invalid device id %d: this machine has %d NPU(s) (ids 0..%d)"
                           % (device_id, count, count - 1))
    _stand_in.CURRENT_DEVICE = device_id


def _dims(value, what):
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("%s must be a non-empty list/tuple of ints, got %r" % (what, value))
    if len(value) > _MAX_RANK:
        raise ValueError("%s has rank %d; at most %d dimensions" % (what, len(value), _MAX_RANK))
    for d in value:
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise ValueError("%s must hold positive ints, got %r" % (what, value))
    return tuple(value)


class Input(object):
    """A compile input: a static ``shape``, or a range ``min_shape``..``max_shape``."""

    def __init__(self, shape=None, dtype=torch.float32, format=TensorFormat.NCHW,
                 min_shape=None, max_shape=None):
        _stand_in.check_alive("torch_aie.Input")
        if shape is not None and (min_shape is not None or max_shape is not None):
            raise ValueError("Input takes either shape or min_shape/max_shape, not both")
        if shape is not None:
            self.shape = _dims(shape, "shape")
            self.min_shape = self.max_shape = None
        elif min_shape is not None and max_shape is not None:
            self.min_shape = _dims(min_shape, "min_shape")
            self.max_shape = _dims(max_shape, "max_shape")
            if len(self.min_shape) != len(self.max_shape):
                raise ValueError("min_shape %s and max_shape %s differ in rank"
                                 % (self.min_shape, self.max_shape))
            if any(hi < lo for lo, hi in zip(self.min_shape, self.max_shape)):
                raise ValueError("max_shape %s is below min_shape %s in some dimension"
                                 % (self.max_shape, self.min_shape))
            self.shape = None
        else:
            raise ValueError("Input needs shape, or both min_shape and max_shape")
        self.dtype = _enums.to_torch_dtype(dtype)
        if not isinstance(format, TensorFormat):
            raise TypeError("format must be a torch_aie.TensorFormat, got %r" % (format,))
        self.format = format

    def spec(self):
        d = {"dtype": str(self.dtype).replace("torch.", ""), "format": self.format.name}
        if self.shape is not None:
            d["shape"] = list(self.shape)
        else:
            d["min"], d["max"] = list(self.min_shape), list(self.max_shape)
        return d

    def __repr__(self):
        if self.shape is not None:
            return "Input(shape=%s, dtype=%s, format=%s)" % (self.shape, self.dtype, self.format.name)
        return "Input(min_shape=%s, max_shape=%s, dtype=%s, format=%s)" % (
            self.min_shape, self.max_shape, self.dtype, self.format.name)


def _alternatives(inputs):
    """``[Input, ...]`` or gears ``[[Input, ...], ...]`` -> the list of allowed Inputs."""
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise ValueError("inputs must be a non-empty list of torch_aie.Input (or of lists: gears)")
    gears = inputs if all(isinstance(g, (list, tuple)) for g in inputs) else [inputs]
    alts = []
    for gear in gears:
        if not gear or not all(isinstance(i, Input) for i in gear):
            raise TypeError("inputs must hold torch_aie.Input objects, got %r" % (gear,))
        if len(gear) != len(gears[0]):
            raise ValueError("every gear must have the same number of inputs")
        if len(gear) != 1:
            raise NotImplementedError("the torch_aie stand-in supports one input per module")
        alts.append(gear[0])
    return alts


def _check_settings(module, inputs, settings):
    if not isinstance(module, torch.jit.ScriptModule):
        raise TypeError("torch_aie.compile needs a TorchScript module (torch.jit.trace or "
                        "torch.jit.script), got %s" % type(module).__name__)
    alts = _alternatives(inputs)
    if not isinstance(settings["precision_policy"], PrecisionPolicy):
        raise TypeError("precision_policy must be a torch_aie.PrecisionPolicy")
    if not isinstance(settings["soc_version"], str) or not settings["soc_version"].startswith("Ascend"):
        raise ValueError("soc_version must name an Ascend SoC, e.g. 'Ascend310P3'")
    level = settings["optimization_level"]
    if not isinstance(level, int) or isinstance(level, bool) or level not in (0, 1, 2):
        raise ValueError("optimization_level must be 0, 1 or 2, got %r" % (level,))
    for key in ("allow_tensor_replace_int", "truncate_long_and_double", "require_full_compilation"):
        if not isinstance(settings[key], bool):
            raise TypeError("%s must be a bool" % key)
    size = settings["min_block_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError("min_block_size must be a positive int")
    ops = settings["torch_executed_ops"]
    if not isinstance(ops, (list, tuple)) or not all(isinstance(o, str) for o in ops):
        raise TypeError("torch_executed_ops must be a list of op names")
    return alts


def compile(module, inputs=None, precision_policy=PrecisionPolicy.FP16,
            soc_version="Ascend310P3", optimization_level=0, allow_tensor_replace_int=False,
            truncate_long_and_double=True, require_full_compilation=False, min_block_size=3,
            torch_executed_ops=[]):  # noqa: B006 (the real signature)
    """Compile a TorchScript module for the (fake) NPU; returns a TorchScript module."""
    _stand_in.check_alive("torch_aie.compile")
    settings = dict(inputs=inputs, precision_policy=precision_policy, soc_version=soc_version,
                    optimization_level=optimization_level,
                    allow_tensor_replace_int=allow_tensor_replace_int,
                    truncate_long_and_double=truncate_long_and_double,
                    require_full_compilation=require_full_compilation,
                    min_block_size=min_block_size, torch_executed_ops=torch_executed_ops)
    alts = _check_settings(module, inputs, settings)
    settings["torch_executed_ops"] = list(torch_executed_ops)
    _stand_in.COMPILE_CALLS += 1
    _stand_in.LAST_COMPILE_KWARGS = settings
    if _stand_in.COMPILE_LOG:
        line = {k: (v.name if isinstance(v, PrecisionPolicy) else v) for k, v in settings.items()}
        line["inputs"] = [a.spec() for a in alts]
        line["pid"] = os.getpid()
        with open(_stand_in.COMPILE_LOG, "a") as f:
            f.write(json.dumps(line) + "\n")
    if _stand_in.COMPILE_SECONDS > 0:
        time.sleep(_stand_in.COMPILE_SECONDS)
    return _compiled.build(module, alts, settings)


_COMPILE_KEYWORDS = ("precision_policy", "soc_version", "optimization_level",
                     "allow_tensor_replace_int", "truncate_long_and_double",
                     "require_full_compilation", "min_block_size", "torch_executed_ops")


def export_engine(module, method_name="forward", path=None, inputs=None, **compile_kwargs):
    """Validate like ``compile`` and write an offline model file (stand-in: JSON, not OM)."""
    _stand_in.check_alive("torch_aie.export_engine")
    unknown = set(compile_kwargs) - set(_COMPILE_KEYWORDS)
    if unknown:
        raise TypeError("export_engine got unexpected keywords %s" % sorted(unknown))
    if not path:
        raise ValueError("export_engine needs path= (the .om file to write)")
    settings = dict(precision_policy=PrecisionPolicy.FP16, soc_version="Ascend310P3",
                    optimization_level=0, allow_tensor_replace_int=False,
                    truncate_long_and_double=True, require_full_compilation=False,
                    min_block_size=3, torch_executed_ops=[])
    settings.update(compile_kwargs)
    alts = _check_settings(module, inputs, settings)
    if not hasattr(module, method_name):
        raise ValueError("module has no method %r" % method_name)
    _stand_in.EXPORT_CALLS += 1
    body = {"stand_in": "torch_aie", "method_name": method_name,
            "inputs": [a.spec() for a in alts],
            "precision_policy": settings["precision_policy"].name,
            "soc_version": settings["soc_version"]}
    with open(path, "w") as f:
        json.dump(body, f)
    return path


def finalize():
    """Tear down; every later torch_aie call, npu copy or compiled-module call fails."""
    _stand_in.check_alive("torch_aie.finalize")
    for s in [npu._DEFAULT[0]]:
        s.synchronize()
    _stand_in.FINALIZED = True

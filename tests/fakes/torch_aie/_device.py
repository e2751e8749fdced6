"""The fake "npu" device of the torch_aie stand-in (test-only).

A Python PrivateUse1 backend renamed "npu" (``torch.utils.backend_registration``), so
``t.to("npu:0")``, ``t.to("cpu")``, ``t.is_npu`` and ``torch.device("npu:0")`` are real.
Each npu tensor is storage-less; its data is a CPU tensor hung on its storage's Python
object (kept alive by PyTorch's storage PyObject preservation, shared by aliases such as
``detach()``).

Only these kernels exist (TORCH_AIE.md: "the npu device supports copies only"):
``empty.memory_format``, ``empty_strided``, ``_copy_from`` (``copy_``), ``_to_copy``
(``.to``/``.cpu``) and ``view``. Any other op on an npu tensor raises
``NotImplementedError`` from the dispatcher, as do ``repr``/indexing, which need more ops.

Copies are charged to the current stream (see ``npu``): host-to-device at
``_stand_in.H2D_GBPS``, device-to-host at ``D2H_GBPS``.
  * blocking copies (``non_blocking=False``) synchronise the current stream
    (TORCH_AIE.md: "``.to("cpu")`` without an explicit stream synchronises");
  * ``non_blocking=True`` H2D from pinned memory returns at once; from pageable memory the
    host waits for that copy (as CUDA does), without marking the stream synchronised;
  * ``non_blocking=True`` D2H into pinned memory (``.to("cpu", non_blocking=True)`` always
    counts as pinned, as PyTorch pins its output) fills the destination with NaN (floats) or
    the dtype's max (integers) and writes the data only when the stream is synchronised.

Pinned memory: PyTorch asks the PrivateUse1 hooks for a pinned allocator, which a Python
backend cannot provide, so once this backend is installed ``Tensor.pin_memory()``,
``torch.empty(..., pin_memory=True)`` and ``DataLoader(pin_memory=True)`` raise
``NotImplementedError`` (and ``is_pinned()`` is False). With
``_stand_in.EMULATE_PINNED = True`` (env ``FAKE_AIE_PINNED=1``) ``Tensor.pin_memory()``
(hence ``DataLoader(pin_memory=True)``) returns a copy flagged as pinned and
``Tensor.is_pinned()`` reports that flag (views share it); factory ``pin_memory=True``
still raises. These two ``torch.Tensor`` methods are patched when the backend is installed;
with the knob off they call the originals.

Older torch (2.0.x, the only torch the real torch_aie ships for) has no Python PrivateUse1
backends (no ``torch._C._acc``, no storage PyObject preservation). There PrivateUse1 is renamed
"npu" (``torch.utils.rename_privateuse1_backend``, in torch since 2.0) and an npu tensor is a
wrapper subclass (:class:`_NpuTensor`, ``_make_wrapper_subclass`` on device ``npu:0``) that
holds its ``_Buffer``; its ``__torch_dispatch__`` runs the same copy kernels and raises
``NotImplementedError`` for every other op. What starts on the cpu cannot reach it: torch 2.0
runs Python kernels registered for PrivateUse1 "hermetically" (they may not make tensor
subclasses), so ``Tensor.to`` (a cpu tensor to npu) and ``torch.empty(..., device="npu")`` are
patched to make the npu tensor themselves (other factories with an npu device raise), and
``Tensor.copy_`` to call the copy kernel, as torch 2.0 asks for an npu device guard first.
``torch.device("npu:0")``, ``t.device.type == "npu"``, ``t.is_npu`` and
``.to("npu")``/``.to("cpu")``/``.cpu()``/``copy_`` behave as with the PrivateUse1 backend, so
the tests are the same on both. Differences: pinned flags (``EMULATE_PINNED``) live in a
table keyed by the storage's address for as long as the tensor ``pin_memory()`` returned
(torch 2.0 drops Python attributes of storages); and ``pin_memory()`` itself fails there for
want of a CUDA driver rather than for want of an npu pinned allocator.
"""
import weakref

import torch

from . import _stand_in, npu

_INSTALLED = []


class _Buffer(object):
    __slots__ = ("data", "hazards")

    def __init__(self, data, hazards=None):
        self.data = data  # contiguous CPU tensor with the npu tensor's shape
        self.hazards = hazards or npu._Hazards()


def _new_npu(data, hazards=None):
    """Wrap the contiguous CPU tensor ``data`` as a new npu:0 tensor."""
    if _MODE[0] == "subclass":
        return _NpuTensor(data, _Buffer(data, hazards))
    out = torch._C._acc.create_empty_tensor(tuple(data.shape), data.dtype)
    out.untyped_storage()._aie_buffer = _Buffer(data, hazards)
    return out


def _buffer(t):
    if isinstance(t, _NpuTensor):
        return t._aie_buffer
    buf = getattr(t.untyped_storage(), "_aie_buffer", None) if _MODE[0] == "privateuse1" else None
    if buf is None:
        raise RuntimeError("npu tensor has no stand-in data (not made by the stand-in)")
    return buf


def _data(t):
    """The CPU tensor holding ``t``'s values (an alias: writes go to the npu tensor)."""
    if isinstance(t, _NpuTensor):
        return t._aie_buffer.data  # made with exactly its data's shape and strides
    data = _buffer(t).data
    if tuple(t.shape) == tuple(data.shape) and t.stride() == data.stride() and t.storage_offset() == 0:
        return data
    return data.as_strided(t.shape, t.stride(), data.storage_offset() + t.storage_offset())


def _nbytes(t):
    return t.numel() * t.element_size()


def _check_device(device, what):
    _stand_in.check_alive(what)
    if device is not None:
        npu._device_index(device)


def _is_pinned(t):
    try:
        return bool(t.is_pinned())
    except Exception:
        return False


def _poison(t):
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(torch.iinfo(t.dtype).max)


def _h2d(src, dst, non_blocking):
    stream = npu.current_stream()
    buf = _buffer(dst)
    npu._check_write(buf.hazards, stream, "copy to npu")
    seq, end = npu._enqueue(stream, "h2d", _nbytes(src) / (_stand_in.H2D_GBPS * 1e9))
    _data(dst).copy_(src)
    npu._did_write(buf.hazards, stream, seq)
    _stand_in.STATS["h2d_bytes"] += _nbytes(src)
    if not non_blocking:
        stream.synchronize()
    elif not _is_pinned(src):
        npu._sleep_until(end)


def _d2h(src, dst, non_blocking, pinned_dst=False):
    stream = npu.current_stream()
    buf = _buffer(src)
    npu._check_read(buf.hazards, stream, "copy to cpu")
    seq, end = npu._enqueue(stream, "d2h", _nbytes(src) / (_stand_in.D2H_GBPS * 1e9))
    npu._did_read(buf.hazards, stream, seq)
    _stand_in.STATS["d2h_bytes"] += _nbytes(src)
    if not non_blocking:
        stream.synchronize()
        dst.copy_(_data(src))
    elif pinned_dst or _is_pinned(dst):
        data = _data(src).clone()
        _poison(dst)
        with npu._LOCK:
            stream._pending.append((seq, dst, data))
    else:
        npu._sleep_until(end)
        dst.copy_(_data(src))


def _d2d(src, dst):
    stream = npu.current_stream()
    sbuf, dbuf = _buffer(src), _buffer(dst)
    npu._check_read(sbuf.hazards, stream, "npu copy")
    npu._check_write(dbuf.hazards, stream, "npu copy")
    seq, _ = npu._enqueue(stream, "compute", 0.0)
    _data(dst).copy_(_data(src))
    npu._did_read(sbuf.hazards, stream, seq)
    npu._did_write(dbuf.hazards, stream, seq)


# ---- kernels -------------------------------------------------------------------------------

def _empty(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    _check_device(device, "torch.empty on npu")
    return _new_npu(torch.empty(tuple(size), dtype=dtype or torch.get_default_dtype()))


def _empty_strided(size, stride, dtype=None, layout=None, device=None, pin_memory=None):
    return _empty(size, dtype=dtype, device=device)


def _copy_from(src, dst, non_blocking=False):
    _stand_in.check_alive("copy to/from npu")
    if src.device.type == "npu" and dst.device.type == "npu":
        _d2d(src, dst)
    elif dst.device.type == "npu":
        if src.device.type != "cpu":
            raise NotImplementedError("npu copies go to or from the cpu only")
        _h2d(src, dst, non_blocking)
    else:
        if dst.device.type != "cpu":
            raise NotImplementedError("npu copies go to or from the cpu only")
        _d2h(src, dst, non_blocking)
    return dst


def _to_copy(self, dtype=None, layout=None, device=None, pin_memory=None,
             non_blocking=False, memory_format=None):
    _stand_in.check_alive("Tensor.to")
    device = self.device if device is None else torch.device(device)
    dtype = dtype or self.dtype
    if self.device.type == "cpu" and device.type == "npu":  # routed here by the npu device arg
        _check_device(device, "Tensor.to")
        out = _new_npu(torch.empty(tuple(self.shape), dtype=dtype))
        _h2d(self, out, non_blocking)
        return out
    if self.device.type != "npu":
        raise NotImplementedError("stand-in _to_copy from %s to %s" % (self.device, device))
    if device.type == "cpu":
        out = torch.empty(tuple(self.shape), dtype=dtype)
        _d2h(self, out, non_blocking, pinned_dst=non_blocking)
        return out
    if device.type != "npu":
        raise NotImplementedError("npu tensors copy to the cpu or the npu only, not %s" % device)
    _check_device(device, "Tensor.to")
    out = _new_npu(torch.empty(tuple(self.shape), dtype=dtype))
    _d2d(self, out)
    return out


def _view(self, size):
    _stand_in.check_alive("Tensor.view")
    buf = _buffer(self)
    return _new_npu(_data(self).view(size), buf.hazards)


_KERNELS = {
    "empty.memory_format": _empty,
    "empty_strided": _empty_strided,
    "_copy_from": _copy_from,
    "_to_copy": _to_copy,
    "view": _view,
}


# ---- npu tensors without a PrivateUse1 Python backend (torch 2.0) ---------------------------

# the compiled module's ops (aie_stand_in::check/enter/leave -> function): they reach
# __torch_dispatch__ where no autograd key runs them first (torch.inference_mode)
PASS_THROUGH = {}


class _NpuTensor(torch.Tensor):
    """An npu:0 tensor on torch without Python PrivateUse1 backends: a storage-less wrapper
    (``_make_wrapper_subclass``) of its ``_Buffer``; every op but the copies raises."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, data, buf):
        t = torch.Tensor._make_wrapper_subclass(cls, tuple(data.shape), strides=data.stride(),
                                                storage_offset=0, dtype=data.dtype,
                                                device=torch.device("npu", 0), requires_grad=False)
        t._aie_buffer = buf
        return t

    @property
    def is_npu(self):
        return True

    def __repr__(self):  # repr needs ops the device does not have (as with the real one)
        raise NotImplementedError("npu tensors support copies only: .to('cpu') first to print one")

    # torch 2.0 asks for an npu device guard before these reach __torch_dispatch__: raise what
    # the PrivateUse1 backend raises
    def __getitem__(self, index):
        raise NotImplementedError("indexing an npu tensor: the npu device supports copies only "
                                  "(.to('cpu') first)")

    def __setitem__(self, index, value):
        raise NotImplementedError("writing into part of an npu tensor: the npu device supports "
                                  "copies only (copy_ a whole tensor)")

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert npu:0 device type tensor to numpy. Use Tensor.cpu() to "
                        "copy the tensor to host memory first.")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fn = PASS_THROUGH.get(str(func._schema.name))
        if fn is not None:
            return fn(*args, **kwargs)
        op = _SUBCLASS_OPS.get(func.overloadpacket)
        if op is None:
            raise NotImplementedError(
                "%s on an npu tensor: the npu device supports copies only (.to('cpu') first)"
                % (func,))
        return op(*args, **kwargs)


def _sub_copy_(dst, src, non_blocking=False):
    return _copy_from(src, dst, non_blocking)


def _sub_detach(self):
    return _NpuTensor(self._aie_buffer.data, self._aie_buffer)


def _sub_view(self, size):
    _stand_in.check_alive("Tensor.view")
    buf = _buffer(self)
    return _new_npu(buf.data.view(size), buf.hazards)


_SUBCLASS_OPS = {
    torch.ops.aten.copy_: _sub_copy_,
    torch.ops.aten._to_copy: _to_copy,
    torch.ops.aten.view: _sub_view,
    torch.ops.aten.detach: _sub_detach,
}


def _is_npu_device(device):
    return device is not None and torch.device(device).type == "npu"


def _patched_to(self, *args, **kwargs):
    """``Tensor.to`` with a cpu tensor going to npu made here (torch 2.0; see the module doc)."""
    if not isinstance(self, _NpuTensor) and self.device.type == "cpu":
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if _is_npu_device(device):
            _stand_in.check_alive("Tensor.to")
            _check_device(device, "Tensor.to")
            out = _new_npu(torch.empty(tuple(self.shape), dtype=dtype or self.dtype))
            _h2d(self, out, non_blocking)
            return out
    return _ORIGINAL["to"](self, *args, **kwargs)


def _patched_copy_(self, src, non_blocking=False):
    """``Tensor.copy_`` to or from an npu tensor (torch 2.0 guards the device before dispatch)."""
    if isinstance(self, _NpuTensor) or isinstance(src, _NpuTensor):
        return _copy_from(src, self, non_blocking)
    return _ORIGINAL["copy_"](self, src, non_blocking)


def _patched_empty(*size, **kwargs):
    """``torch.empty`` with ``device="npu"`` made here (torch 2.0; see the module doc)."""
    if _is_npu_device(kwargs.get("device")):
        if kwargs.get("pin_memory"):
            raise RuntimeError("pin_memory=True is for cpu tensors, not npu ones")
        if len(size) == 1 and isinstance(size[0], (list, tuple, torch.Size)):
            size = tuple(size[0])
        return _empty(size, dtype=kwargs.get("dtype"), device=kwargs["device"])
    return _ORIGINAL["empty"](*size, **kwargs)

# ---- pinned memory ---------------------------------------------------------------------------

_ORIGINAL = {}
# torch 2.0: storage address -> True while the tensor pin_memory() returned lives
_PINNED_PTRS = {}


def _pin_memory(self, device=None):
    if not _stand_in.EMULATE_PINNED:
        return _ORIGINAL["pin_memory"](self) if device is None else _ORIGINAL["pin_memory"](self, device)
    if self.device.type != "cpu":
        raise RuntimeError("cannot pin '%s' memory: only dense CPU tensors can be pinned" % self.device)
    if _pin_flag(self):
        return self
    out = self.clone()
    if _MODE[0] == "subclass":
        ptr = out.untyped_storage().data_ptr()
        _PINNED_PTRS[ptr] = True
        weakref.finalize(out, _PINNED_PTRS.pop, ptr, None)
    else:
        out.untyped_storage()._aie_pinned = True
    return out


def _pin_flag(t):
    if t.device.type != "cpu" or isinstance(t, _NpuTensor):
        return False
    if _MODE[0] == "subclass":
        return t.untyped_storage().data_ptr() in _PINNED_PTRS
    return bool(getattr(t.untyped_storage(), "_aie_pinned", False))


def _is_pinned_patched(self, device=None):
    if not _stand_in.EMULATE_PINNED:
        return _ORIGINAL["is_pinned"](self) if device is None else _ORIGINAL["is_pinned"](self, device)
    return _pin_flag(self)


_MODE = [None]  # "privateuse1" (a Python PrivateUse1 backend) or "subclass" (torch 2.0)


def _install_subclass():
    """torch 2.0: PrivateUse1 renamed "npu", npu tensors as :class:`_NpuTensor` wrappers."""
    rename = getattr(torch.utils, "rename_privateuse1_backend", None)
    if rename is None:
        raise ImportError(
            "the torch_aie stand-in needs torch.utils.rename_privateuse1_backend (torch >= 2.0) "
            "or Python PrivateUse1 backends (torch._C._acc); this is torch %s: install "
            "torch==2.0.1 (the reference's) or newer" % torch.__version__)
    try:
        rename("npu")
    except RuntimeError as exc:
        if torch.device("npu:0").type != "npu":
            raise ImportError("cannot name PrivateUse1 'npu' in this process: %s" % exc)
    _ORIGINAL["to"] = torch.Tensor.to
    _ORIGINAL["empty"] = torch.empty
    _ORIGINAL["copy_"] = torch.Tensor.copy_
    torch.Tensor.to = _patched_to
    torch.Tensor.copy_ = _patched_copy_
    torch.empty = _patched_empty
    _MODE[0] = "subclass"


def install():
    """Register the "npu" backend in this process (idempotent; cannot be undone)."""
    if _INSTALLED:
        return
    setup = None
    try:
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend as setup
    except ImportError:
        pass
    if setup is None or not hasattr(getattr(torch._C, "_acc", None), "create_empty_tensor"):
        _install_subclass()
    else:
        name = torch._C._get_privateuse1_backend_name()
        if name not in ("privateuseone", "npu"):
            raise ImportError("PrivateUse1 is already taken by %r in this process" % name)
        if name == "privateuseone":
            setup("npu")
        for op, fn in _KERNELS.items():
            torch.library.impl("aten::" + op, "PrivateUse1")(fn)
        _MODE[0] = "privateuse1"
    _ORIGINAL["pin_memory"] = torch.Tensor.pin_memory
    _ORIGINAL["is_pinned"] = torch.Tensor.is_pinned
    torch.Tensor.pin_memory = _pin_memory
    torch.Tensor.is_pinned = _is_pinned_patched
    npu._reset_timeline()  # the default stream needs the "npu" device name
    _INSTALLED.append(True)

"""Enums of the torch_aie stand-in (test-only): PrecisionPolicy, TensorFormat, dtype.

TORCH_AIE.md: precision FP16, FP32, PREF_FP32, PREF_FP16, reachable as both
``torch_aie.PrecisionPolicy`` and ``torch_aie._enums.PrecisionPolicy`` (same objects);
formats NCHW and ND; dtypes FLOAT, FLOAT16, INT32, INT64, BOOL. ``dtype.UINT8`` is not
documented, so it exists only while ``_stand_in.ACCEPT_UINT8`` is true.
"""
from enum import Enum

import torch

from . import _stand_in


class PrecisionPolicy(Enum):
    FP16 = "FP16"
    FP32 = "FP32"
    PREF_FP32 = "PREF_FP32"
    PREF_FP16 = "PREF_FP16"


#: policies under which the stand-in rounds weights and activations through float16
HALF_POLICIES = (PrecisionPolicy.FP16, PrecisionPolicy.PREF_FP16)


class TensorFormat(Enum):
    NCHW = "NCHW"
    ND = "ND"


class _DType(object):
    """One ``torch_aie.dtype`` member; ``.torch_dtype`` is the matching torch dtype."""

    def __init__(self, name, torch_dtype):
        self.name = name
        self.torch_dtype = torch_dtype

    def __repr__(self):
        return "torch_aie.dtype." + self.name


_UINT8 = _DType("UINT8", torch.uint8)


class _DTypeMeta(type):
    def __getattr__(cls, name):
        if name == "UINT8" and _stand_in.ACCEPT_UINT8:
            return _UINT8
        raise AttributeError("type object 'dtype' has no attribute %r" % name)


class dtype(metaclass=_DTypeMeta):
    FLOAT = _DType("FLOAT", torch.float32)
    FLOAT16 = _DType("FLOAT16", torch.float16)
    INT32 = _DType("INT32", torch.int32)
    INT64 = _DType("INT64", torch.int64)
    BOOL = _DType("BOOL", torch.bool)


_DOCUMENTED = (torch.float32, torch.float16, torch.int32, torch.int64, torch.bool)


def to_torch_dtype(value):
    """Map a ``torch_aie.dtype`` member or a torch dtype to a torch dtype, refusing the rest."""
    if isinstance(value, _DType):
        value = value.torch_dtype
    if not isinstance(value, torch.dtype):
        raise TypeError("Input dtype must be a torch dtype or torch_aie.dtype member, got %r" % (value,))
    if value in _DOCUMENTED or (value == torch.uint8 and _stand_in.ACCEPT_UINT8):
        return value
    raise TypeError("torch_aie.Input does not support dtype %s (supported: FLOAT, FLOAT16, "
                    "INT32, INT64, BOOL)" % value)

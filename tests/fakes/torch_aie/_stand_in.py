"""Knobs and counters of the *test-only* torch_aie stand-in (not part of the real API).

Every knob is a plain module attribute read at call time, so a test may change it
(``torch_aie._stand_in.DEVICE_MS_PER_BATCH = 50``). Its start value comes from an
environment variable, so a subprocess test can set it before ``import torch_aie``:

===================  ======================  =======  ===============================================
attribute            environment variable    default  meaning
===================  ======================  =======  ===============================================
DEVICE_MS_PER_BATCH  FAKE_AIE_BATCH_MS       0.6      simulated device ms per compiled-module call
DEVICE_MS_PER_IMAGE  FAKE_AIE_IMAGE_MS       0.28     plus this per element of dimension 0
H2D_GBPS             FAKE_AIE_H2D_GBPS       12.0     host-to-device copy bandwidth, GB/s
D2H_GBPS             FAKE_AIE_D2H_GBPS       12.0     device-to-host copy bandwidth, GB/s
ACCEPT_UINT8         FAKE_AIE_ACCEPT_UINT8   False    let Input take uint8 (undocumented in the real one)
EMULATE_PINNED       FAKE_AIE_PINNED         False    make Tensor.pin_memory()/is_pinned() work
COMPILE_SECONDS      FAKE_AIE_COMPILE_S      0.0      simulated wall time of one compile()
COMPILE_LOG          FAKE_AIE_COMPILE_LOG    None     file: one JSON line appended per compile()
DEVICES              FAKE_AIE_DEVICES        1        NPUs the machine has (set_device accepts 0..N-1)
===================  ======================  =======  ===============================================

The defaults approximate ResNeXt-50 on a 310P3 (TORCH_AIE.md's table: ~1,100 img/s at
batch 1, ~3,500 img/s at batch 32) behind a PCIe link.

Counters (reset by :func:`reset`): ``COMPILE_CALLS``, ``LAST_COMPILE_KWARGS`` (the keyword
arguments of the last ``compile``, defaults filled in), ``EXPORT_CALLS`` and ``STATS``
(calls, images, h2d_bytes, d2h_bytes, syncs). ``CURRENT_DEVICE`` is what ``set_device``
last set (0 by default); ``FINALIZED`` turns true in ``finalize()``.
"""
import os


def _env_float(name, default):
    value = os.environ.get(name)
    return default if value in (None, "") else float(value)


def _env_bool(name, default=False):
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


_DEFAULTS = {}


def _load_from_env():
    return {
        "DEVICE_MS_PER_BATCH": _env_float("FAKE_AIE_BATCH_MS", 0.6),
        "DEVICE_MS_PER_IMAGE": _env_float("FAKE_AIE_IMAGE_MS", 0.28),
        "H2D_GBPS": _env_float("FAKE_AIE_H2D_GBPS", 12.0),
        "D2H_GBPS": _env_float("FAKE_AIE_D2H_GBPS", 12.0),
        "ACCEPT_UINT8": _env_bool("FAKE_AIE_ACCEPT_UINT8"),
        "EMULATE_PINNED": _env_bool("FAKE_AIE_PINNED"),
        "COMPILE_SECONDS": _env_float("FAKE_AIE_COMPILE_S", 0.0),
        "COMPILE_LOG": os.environ.get("FAKE_AIE_COMPILE_LOG") or None,
        "DEVICES": int(_env_float("FAKE_AIE_DEVICES", 1)),
    }


DEVICE_MS_PER_BATCH = DEVICE_MS_PER_IMAGE = H2D_GBPS = D2H_GBPS = None
ACCEPT_UINT8 = EMULATE_PINNED = False
COMPILE_SECONDS = 0.0
COMPILE_LOG = None
DEVICES = 1

COMPILE_CALLS = 0
LAST_COMPILE_KWARGS = None
EXPORT_CALLS = 0
STATS = {}
CURRENT_DEVICE = 0
FINALIZED = False


def reset():
    """Restore the knobs to their environment/default values and zero the counters.

    Also forgets queued device time and makes the default stream current again
    (it does not undo ``finalize()``, which is final like the real one).
    """
    global COMPILE_CALLS, LAST_COMPILE_KWARGS, EXPORT_CALLS, STATS
    _DEFAULTS.clear()
    _DEFAULTS.update(_load_from_env())
    globals().update(_DEFAULTS)
    COMPILE_CALLS = 0
    LAST_COMPILE_KWARGS = None
    EXPORT_CALLS = 0
    STATS = {"calls": 0, "images": 0, "h2d_bytes": 0, "d2h_bytes": 0, "syncs": 0}
    import sys
    npu = sys.modules.get(__name__.rsplit(".", 1)[0] + ".npu")
    if npu is not None:
        npu._reset_timeline()


def check_alive(what="torch_aie"):
    """Raise like any call after ``torch_aie.finalize()`` (TORCH_AIE.md: nothing works after it)."""
    if FINALIZED:
        raise RuntimeError("%s: torch_aie.finalize() was called; nothing works after it" % what)


reset()

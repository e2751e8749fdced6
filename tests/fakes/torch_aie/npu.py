"""``torch_aie.npu`` of the stand-in (test-only): streams, and the simulated device clock.

TORCH_AIE.md: ``Stream("npu:0")``, ``with stream(s):``, ``s.synchronize()``,
``default_stream()``, ``current_stream()``, ``set_stream(s)``; there are **no events**
(and no module-level ``synchronize``, which the doc does not list): completion is known
only through the blocking ``Stream.synchronize()``.

Timing model (stand-in fact 4, "asynchronous"): work is enqueued on the current stream and
on one of three engines ("h2d", "compute", "d2h"); it starts when both its stream and its
engine are free, so copies overlap compute only when they run on different streams.
Enqueuing returns at once; ``Stream.synchronize()`` sleeps (``time.sleep``, GIL released)
until the stream's last piece of work ends. Results are computed eagerly on the CPU, but a
non-blocking device-to-host copy only writes its destination at that synchronize.

Hazards: each stream counts its work (``seq``) and remembers the last count a synchronize
has seen. An npu buffer remembers who last wrote and read it; touching it from another
stream before that stream was synchronized raises (with no events, a host synchronize is
the only way real code can order two streams).
"""
import threading
import time

import torch

from . import _stand_in

_LOCK = threading.RLock()
_ENGINES = {"h2d": 0.0, "compute": 0.0, "d2h": 0.0}
_LOCAL = threading.local()


def _device_index(device):
    if device is None:
        return 0
    if isinstance(device, int) and not isinstance(device, bool):
        index = device
    else:
        dev = torch.device(device)
        if dev.type != "npu":
            raise ValueError("expected an npu device, got %r" % (device,))
        index = 0 if dev.index is None else dev.index
    from . import _stand_in

    if not 0 <= index < _stand_in.DEVICES:
        raise RuntimeError("invalid npu device %r: the stand-in has %d device(s), npu:0..npu:%d (FAKE_AIE_DEVICES)"
                           % (device, _stand_in.DEVICES, _stand_in.DEVICES - 1))
    # one simulated chip per process: npu:K is the chip of the process that set device K (its
    # tensors still say npu:0, as the wrapper subclass has one device)
    return index


class Stream(object):
    """An npu stream. No ``query``/``record_event``/``wait_event``: only ``synchronize``."""

    def __init__(self, device="npu:0"):
        _stand_in.check_alive("torch_aie.npu.Stream")
        self._setup(device)

    def _setup(self, device):
        self.device = torch.device("npu", _device_index(device))
        self._busy_until = 0.0
        self._seq = 0       # pieces of work enqueued so far
        self._done = 0      # the last seq a synchronize() has seen complete
        self._pending = []  # (seq, cpu_dst, data): non-blocking D2H copies, written at sync

    def synchronize(self):
        """Block until everything enqueued on this stream has finished (pays its device time)."""
        _stand_in.check_alive("Stream.synchronize")
        with _LOCK:
            until, seq = self._busy_until, self._seq
        delay = until - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        with _LOCK:
            ready = [p for p in self._pending if p[0] <= seq]
            self._pending = [p for p in self._pending if p[0] > seq]
            self._done = max(self._done, seq)
            _stand_in.STATS["syncs"] += 1
        for _, dst, data in ready:
            dst.copy_(data)

    def __repr__(self):
        kind = "default " if self is _DEFAULT[0] else ""
        return "<torch_aie.npu.Stream %sdevice=%s at 0x%x>" % (kind, self.device, id(self))


_DEFAULT = [None]


def default_stream(device=None):
    _stand_in.check_alive("torch_aie.npu.default_stream")
    _device_index(device)
    return _DEFAULT[0]


def current_stream(device=None):
    _stand_in.check_alive("torch_aie.npu.current_stream")
    _device_index(device)
    return getattr(_LOCAL, "stream", None) or _DEFAULT[0]


def set_stream(stream):
    _stand_in.check_alive("torch_aie.npu.set_stream")
    if not isinstance(stream, Stream):
        raise TypeError("set_stream expects a torch_aie.npu.Stream, got %r" % (stream,))
    _LOCAL.stream = stream


class stream(object):
    """``with torch_aie.npu.stream(s):`` makes ``s`` current in this thread (``None``: no-op)."""

    def __init__(self, stream):
        if stream is not None and not isinstance(stream, Stream):
            raise TypeError("torch_aie.npu.stream expects a Stream or None, got %r" % (stream,))
        self.stream = stream
        self._saved = None

    def __enter__(self):
        _stand_in.check_alive("torch_aie.npu.stream")
        self._saved = getattr(_LOCAL, "stream", None)
        if self.stream is not None:
            _LOCAL.stream = self.stream
        return self.stream

    def __exit__(self, *exc):
        _LOCAL.stream = self._saved
        return False


# ---- the simulated device clock (stand-in internals) --------------------------------------

def _reset_timeline():
    with _LOCK:
        for key in _ENGINES:
            _ENGINES[key] = 0.0
        _DEFAULT[0] = Stream.__new__(Stream)
        _DEFAULT[0]._setup("npu:0")
        _LOCAL.__dict__.clear()


def _enqueue(stream, engine, seconds, not_before=None):
    """Queue ``seconds`` of work on ``stream`` and ``engine``; return ``(seq, end_time)``."""
    with _LOCK:
        start = max(time.monotonic(), stream._busy_until, _ENGINES[engine], not_before or 0.0)
        end = start + max(0.0, seconds)
        stream._busy_until = end
        _ENGINES[engine] = end
        stream._seq += 1
        return stream._seq, end


def _sleep_until(when):
    delay = when - time.monotonic()
    if delay > 0:
        time.sleep(delay)


class _Hazards(object):
    """Who last wrote / read one npu buffer (shared by the buffer and its views)."""

    def __init__(self):
        self.write = None  # (stream, seq)
        self.reads = {}    # id(stream) -> (stream, seq)


def _unsynced(record, stream):
    return record is not None and record[0] is not stream and record[0]._done < record[1]


def _check_read(hazards, stream, what):
    if _unsynced(hazards.write, stream):
        raise RuntimeError(
            "%s: this npu tensor is written by work on %r that no synchronize() has seen "
            "finish; torch_aie has no events, so synchronize that stream before using the "
            "tensor on %r" % (what, hazards.write[0], stream))


def _check_write(hazards, stream, what):
    _check_read(hazards, stream, what)
    for record in hazards.reads.values():
        if _unsynced(record, stream):
            raise RuntimeError(
                "%s: this npu tensor is still being read by work on %r that no synchronize() "
                "has seen finish; synchronize that stream before overwriting it from %r"
                % (what, record[0], stream))


def _did_read(hazards, stream, seq):
    hazards.reads[id(stream)] = (stream, seq)


def _did_write(hazards, stream, seq):
    hazards.write = (stream, seq)
    hazards.reads = {}


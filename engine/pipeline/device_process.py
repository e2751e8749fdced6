"""One device process of `--devices` (engine/pipeline/devices.py is the parent's side).

Run as `python -m engine.pipeline.device_process --fd N` by `DeviceGroup`. It owns one device: it
creates its backend here (so `torch_aie.set_device`, CUDA or NPU initialisation happen in this
process only, never in the parent), prepares the model, and scores batches whose pixels it reads
from shared memory the parent names (a ring slot, the pixel cache's mapped file, or a staging
block), writing the logits into a shared block of its own. Messages over the socket are small
tuples; pixels and logits never travel through it:

    parent -> device   ("init", config dict, device id)
                       ("prepare", batch size)
                       ("map", region id, path, bytes)               map a block or file, read-only
                       ("logits", block name, slots, batch, classes)
                       ("run", job, region id, offset, rows, n, out slot)
                       ("compute", batch size, iterations, warm-up)
                       None                                          finish and exit
    device -> parent   ("hello", backend name, device count, pid)
                       ("prepared", static shape, description)
                       ("copied", job)                               the pixels may be overwritten
                       ("done", job, rows, classes, failed rows)     logits in the out slot
                       ("latencies", [seconds, ...])
                       ("error", job or None, message)               then it exits with status 3

A second thread waits for results in submission order, so one batch copies while another computes.

Test-only fault injection (tests/test_devices.py): `IMAGENET_ENGINE_DEVICE_FAULT=raise:ID:N` makes
device ID's backend fail on its N-th batch (an exception from `result()`, as a vendor library's
error would be), so the process reports it and exits.
"""

from __future__ import annotations

import argparse
import mmap
import os
import queue
import socket
import sys
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any, Dict, Optional, Tuple

import numpy as np

from preprocess.ringlayout import attach_block

EXIT_ERROR = 3


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: SIGKILL when the parent dies (Linux), so no device process outlives a run."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _map_file(path: str, nbytes: int):
    """A read-only mapping of the first `nbytes` of a file (the pixel cache's pixels)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)


class DeviceServer:
    """The device process's loop: see the module's docstring."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.send_lock = threading.Lock()
        self.backend: Any = None  # the backend this process drives (engine/backends), made by serve()
        self.regions: Dict[int, Any] = {}  # region id -> mmap of the ring, the cache's file, a staging block
        self.logits: Optional[np.ndarray] = None
        self.shape: Tuple[int, ...] = ()
        self.results: "queue.Queue" = queue.Queue()
        self.fault_at = 0  # IMAGENET_ENGINE_DEVICE_FAULT: fail on this batch (1-based); 0 never
        self.batches = 0

    def send(self, msg) -> None:
        with self.send_lock:
            self.conn.send(msg)

    def serve(self) -> int:
        from engine.backends import create_backend
        from engine.config import config_from_dict

        msg = self.conn.recv()
        assert msg[0] == "init", msg
        cfg = config_from_dict(msg[1])
        fault = os.environ.get("IMAGENET_ENGINE_DEVICE_FAULT", "").split(":")
        if len(fault) == 3 and fault[0] == "raise" and int(fault[1]) == msg[2]:
            self.fault_at = int(fault[2])
        self.shape = tuple(cfg.preprocess.shape)
        self.backend = create_backend(cfg)
        self.send(("hello", self.backend.name, self.backend.device_count_available(), os.getpid()))
        waiter = threading.Thread(target=self._wait_results, name="results", daemon=True)
        waiter.start()
        try:
            while True:
                try:
                    msg = self.conn.recv()
                except EOFError:
                    break
                if msg is None:
                    break
                self._handle(msg)
        finally:
            self.results.put(None)
            waiter.join()
            self.backend.unregister_host_memory()
            self.backend.close()
        return 0

    def _handle(self, msg) -> None:
        kind = msg[0]
        if kind == "prepare":
            self.backend.prepare(msg[1])
            self.send(("prepared", bool(self.backend.static_shape), self.backend.describe()))
        elif kind == "map":
            _, rid, path, nbytes = msg
            old = self.regions.pop(rid, None)
            if path.startswith("/dev/shm/"):
                self.regions[rid] = attach_block(os.path.basename(path), nbytes)
                if rid == 0:  # the ring: pinned where the device allows, as a one-device run pins it
                    self.backend.register_host_memory(self.regions[rid])
            else:
                self.regions[rid] = _map_file(path, nbytes)
            if old is not None and rid != 0:
                try:
                    old.close()
                except BufferError:
                    pass
        elif kind == "logits":
            _, name, slots, batch, classes = msg
            self.logits = np.ndarray((slots, batch, classes), np.float32, attach_block(name, slots * batch * classes * 4))
        elif kind == "run":
            _, job, rid, offset, rows, n, slot = msg
            pixels = np.ndarray((rows,) + self.shape, np.uint8, self.regions[rid], offset)
            pixels.flags.writeable = False
            inflight = self.backend.submit(pixels)
            inflight.copied()
            self.send(("copied", job))
            self.results.put((job, inflight, slot, n))
        elif kind == "compute":
            _, batch, iterations, warmup = msg
            self.send(("latencies", self.backend.compute_only(batch, iterations, warmup)))
        else:
            raise ValueError(f"unknown message {kind!r}")

    def _wait_results(self) -> None:
        while True:
            item = self.results.get()
            if item is None:
                return
            job, inflight, slot, n = item
            self.batches += 1
            try:
                if self.batches == self.fault_at:
                    raise RuntimeError(f"injected device fault at batch {self.batches} (IMAGENET_ENGINE_DEVICE_FAULT)")
                logits = np.asarray(inflight.result(), np.float32)
                rows, classes = logits.shape
                assert self.logits is not None, "no logits block was given"
                self.logits[slot, :rows, :classes] = logits
                self.send(("done", job, rows, classes, list(inflight.failed_rows())))
            except BaseException:
                self.send(("error", job, traceback.format_exc()))
                os._exit(EXIT_ERROR)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="device_process", allow_abbrev=False)
    p.add_argument("--fd", type=int, required=True)
    a = p.parse_args(argv)
    _die_with_parent()
    sock = socket.socket(fileno=a.fd)
    conn = Connection(sock.detach())
    server = DeviceServer(conn)
    try:
        return server.serve()
    except BaseException as e:  # an error of the backend: say it, then go (the parent redoes our batches)
        try:
            server.send(("error", None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        except OSError:
            pass
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

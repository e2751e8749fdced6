"""The worker loop: read a file, decode, resize, crop, write into a ring slot.

Run as `python -m preprocess.worker --fd N --ring NAME ...` by `engine.pool.WorkerPool`. A worker
is single-threaded, imports no torch, and talks to the parent over one socket (the `--fd`):

    parent -> worker   (job_id, slot, [(row, path), ...])      or None: exit
    worker -> parent   ("ready", pid)
                       ("done", job_id, [(row, reason), ...], t_start, t_end)   failures only
                       ("error", job_id, row, path, traceback)   a bug, re-raised by the parent

Pixels, per-image status and decode times go into the shared ring, never through the socket.
See NOTE [Slot ownership and shutdown] in engine/ring.py for who may write what and when.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from multiprocessing.connection import Connection

from engine.ring import BUSY, FAILED, OK, Ring
from preprocess.decode import DecodeError, preprocess_into


def _os_reason(e: OSError) -> str:
    if isinstance(e, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(e, FileNotFoundError):
        return "file not found (deleted, or a broken symlink)"
    if isinstance(e, PermissionError):
        return "cannot read: permission denied"
    return f"cannot read: {e.strerror or e}"


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its parent dies (the EOF check covers the rest)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_job(ring: Ring, slot: int, rows, resize: int, interpolation: str, mode: str):
    """Fill the given rows of a slot. Returns (failures, None) or (failures, (row, path, traceback))."""
    pixels, status, decode_ns = ring.pixels(slot), ring.status[slot], ring.decode_ns[slot]
    started = ring.started[slot]
    failures = []
    for row, path in rows:
        started[row] = time.monotonic()  # for the parent's watchdog (a hung decode)
        status[row] = BUSY  # so the parent can tell which image a dead worker was decoding
        t = time.perf_counter_ns()
        try:
            with open(path, "rb") as f:
                data = f.read()
            preprocess_into(data, pixels[row], resize, interpolation, mode)
        except DecodeError as e:
            status[row] = FAILED
            failures.append((row, str(e)))
        except OSError as e:
            status[row] = FAILED
            failures.append((row, _os_reason(e)))
        except Exception:
            status[row] = FAILED
            return failures, (row, path, traceback.format_exc())
        else:
            status[row] = OK
        decode_ns[row] = time.perf_counter_ns() - t
    return failures, None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="preprocess.worker")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--ring", required=True)
    p.add_argument("--slots", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--crop", type=int, nargs=2, required=True)
    p.add_argument("--resize", type=int, required=True)
    p.add_argument("--interpolation", required=True)
    p.add_argument("--decode", required=True)
    p.add_argument("--parent", type=int, required=True)
    a = p.parse_args(argv)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent()
    if os.getppid() != a.parent:
        return 0  # the parent died before we armed PR_SET_PDEATHSIG
    conn = Connection(a.fd)
    ring = Ring.attach(a.ring, a.slots, a.batch, (a.crop[0], a.crop[1], 3))
    try:
        conn.send(("ready", os.getpid()))
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return 0  # parent closed the pipe or died
            if msg is None:
                return 0
            job_id, slot, rows = msg
            t0 = time.monotonic()
            failures, error = run_job(ring, slot, rows, a.resize, a.interpolation, a.decode)
            if error is not None:
                conn.send(("error", job_id) + error)
                return 1
            conn.send(("done", job_id, failures, t0, time.monotonic()))
    except (BrokenPipeError, ConnectionResetError):
        return 0
    finally:
        ring.close()


if __name__ == "__main__":
    sys.exit(main())

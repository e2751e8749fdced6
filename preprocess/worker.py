"""The worker loop: read a file, decode, resize, crop, write into a ring slot.

Run as `python -m preprocess.worker --fd N --ring NAME ...` by `engine.pipeline.pool.WorkerPool`. A worker
is single-threaded, imports no torch, and talks to the parent over one socket (the `--fd`):

    parent -> worker   (job_id, slot, [(row, path), ...])      or None: exit
    worker -> parent   ("ready", pid)
                       ("done", job_id, [(row, reason), ...], t_start, t_end)   failures only
                       ("error", job_id, row, path, traceback)   a bug, re-raised by the parent

Pixels, per-image status and decode times go into the shared ring, never through the socket.
See NOTE [Slot ownership and shutdown] in engine/pipeline/ring.py for who may write what and when.

Bad files are failed images (status FAILED and a reason), never an exception: anything that is
not a regular file (a directory, a FIFO, a device, a broken symlink) is refused before it is
read, so a FIFO cannot block the worker and a link to /dev/zero cannot fill its memory.

Test-only fault injection (see tests/test_faults.py): `IMAGENET_ENGINE_FAULT` is read once at
start; unset, it costs one falsy test per image. It holds comma-separated `ACTION:SUBSTRING`
items; the action runs when the path of the image about to be decoded contains SUBSTRING:

    segfault   crash in native code (a NULL read through ctypes: a real SIGSEGV)
    kill       SIGKILL itself
    exit       os._exit(7)
    sleep      sleep an hour (a hung decoder; the parent's watchdog must kill it)
    raise      raise RuntimeError (a bug in the worker: the parent stops with its traceback)

`ACTION-once:SUBSTRING` fires only the first time any worker meets that image; it needs
`IMAGENET_ENGINE_FAULT_DIR`, a folder where the workers leave one marker file per image hit.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time
import traceback
import warnings
from multiprocessing.connection import Connection
from typing import List, Optional, Tuple

from preprocess.ringlayout import BUSY, FAILED, OK, RingView
from preprocess.containers import ByteReader, describe, read_file  # noqa: F401 (read_file: the API)
from preprocess.decode import DecodeError, preprocess_into

FAULT_ENV = "IMAGENET_ENGINE_FAULT"
FAULT_DIR_ENV = "IMAGENET_ENGINE_FAULT_DIR"
FAULT_ACTIONS = ("segfault", "kill", "exit", "sleep", "raise")

Fault = Tuple[str, bool, str]  # (action, once, substring)


def _os_reason(e: OSError, path: str) -> str:
    if isinstance(e, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(e, FileNotFoundError):
        if os.path.islink(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return f"broken symlink (points to {target}, which does not exist)"
        return "file not found (deleted after the index was built?)"
    if isinstance(e, PermissionError):
        return "cannot read: permission denied"
    return f"cannot read: {e.strerror or e}"


def _container_reason(e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return "its container file is gone (deleted after the index was built?)"
    if isinstance(e, PermissionError):
        return "cannot read its container: permission denied"
    return f"cannot read its container: {e.strerror or e}"


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its parent dies (the EOF check covers the rest).

    The kernel sends it when the *thread* that forked us exits: the pool spawns workers from the
    event-loop thread, which lives as long as the run.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def parse_faults(text: Optional[str]) -> List[Fault]:
    """`ACTION[-once]:SUBSTRING,...` -> [(action, once, substring)]; see the module docstring."""
    faults: List[Fault] = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        action, sep, sub = item.strip().partition(":")
        once = action.endswith("-once")
        action = action[:-len("-once")] if once else action
        if not sep or not sub or action not in FAULT_ACTIONS:
            raise ValueError(f"{FAULT_ENV}: bad item {item!r}; expected ACTION[-once]:SUBSTRING with ACTION one of "
                             f"{', '.join(FAULT_ACTIONS)}")
        if once and not os.environ.get(FAULT_DIR_ENV):
            raise ValueError(f"{FAULT_ENV}: {item!r} needs {FAULT_DIR_ENV} (a folder for the once-markers)")
        faults.append((action, once, sub))
    return faults


def _inject(faults: List[Fault], path: str) -> None:
    """Test-only: misbehave as `IMAGENET_ENGINE_FAULT` says when `path` matches."""
    for action, once, sub in faults:
        if sub not in path:
            continue
        if once:
            marker = os.path.join(os.environ[FAULT_DIR_ENV],
                                  f"{action}-{hashlib.sha1(path.encode('utf-8', 'surrogateescape')).hexdigest()}")
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue  # already fired for this image
            os.write(fd, f"{os.getpid()} {time.monotonic()!r}\n".encode())  # for the tests: who, when
            os.close(fd)
        sys.stderr.flush()
        if action == "segfault":
            import ctypes

            ctypes.string_at(0)  # a NULL read in native code
        elif action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "exit":
            os._exit(7)
        elif action == "sleep":
            time.sleep(3600)
        elif action == "raise":
            raise RuntimeError(f"injected fault on {path}")


def run_job(ring: RingView, slot: int, rows, resize: int, interpolation: str, mode: str,
            max_pixels: Optional[int] = None, faults: Optional[List[Fault]] = None, place=None,
            reader: Optional[ByteReader] = None):
    """Fill the given rows of a slot. Returns (failures, None) or (failures, (row, name, traceback)).

    `rows` are (row, locator) pairs (preprocess/containers.py: a path, a tar byte range, a Parquet
    row), read by `reader` (one per worker: it keeps the containers open between jobs).

    `place(data, row)`, where given, puts an image's bytes into the slot instead of decoding them
    here (`--decode device`: `BytePlacer`); it raises what `preprocess_into` raises."""
    pixels, status, decode_ns = ring.pixels(slot), ring.status[slot], ring.decode_ns[slot]
    started = ring.started[slot]
    failures = []
    reader = reader if reader is not None else ByteReader()
    for row, ref in rows:
        path = describe(ref)
        started[row] = time.monotonic()  # for the parent's watchdog (a hung decode)
        status[row] = BUSY  # so the parent can tell which image a dead worker was decoding
        t = time.perf_counter_ns()
        try:
            if faults:
                _inject(faults, path)
            data = reader.read(ref)
            if place is not None:
                place(data, row)
            else:
                preprocess_into(data, pixels[row], resize, interpolation, mode, max_pixels=max_pixels)
        except DecodeError as e:
            status[row] = FAILED
            reason = str(e)
            if reason.startswith("decompression bomb"):
                reason += " (raise the limit with --max-image-pixels)"
            failures.append((row, reason))
        except OSError as e:
            status[row] = FAILED
            failures.append((row, _os_reason(e, path) if isinstance(ref, str) else _container_reason(e)))
        except MemoryError:
            status[row] = FAILED
            failures.append((row, "out of memory while decoding (lower --workers, or --max-image-pixels)"))
        except Exception:
            status[row] = FAILED
            return failures, (row, path, traceback.format_exc())
        else:
            status[row] = OK
        decode_ns[row] = time.perf_counter_ns() - t
    return failures, None


class BytePlacer:
    """`--decode device`: a JPEG the device decoder takes goes into the slot's byte arena as it is
    (offset, length, route DEVICE); anything else is decoded here in exact mode into its pixel row,
    with the reason in `route` (preprocess/jpeghead.py). The chunk's rows own arena bytes
    [lo * per_image, (hi + 1) * per_image) (NOTE in engine/pipeline/ring.py): images of one chunk
    share that room, and one that does not fit any more is decoded here instead."""

    def __init__(self, ring: RingView, slot: int, rows, resize: int, interpolation: str, max_pixels: int):
        from preprocess.ringlayout import CTRL_HOST_SHARE, CTRL_KINDS, CTRL_MAX_PIXELS

        self.ring, self.slot, self.resize, self.interpolation = ring, slot, resize, interpolation
        self.max_pixels = max_pixels
        per = ring.arena_per_image
        lo = min(r for r, _ in rows)
        self.cursor, self.end = lo * per, (max(r for r, _ in rows) + 1) * per
        # a redone job (its worker died) starts after the bytes its chunk's finished rows already hold
        from preprocess.jpeghead import ROUTE_DEVICE

        ends = ring.offsets[slot] + ring.lengths[slot]
        held = (ring.status[slot] == OK) & (ring.route[slot] == ROUTE_DEVICE) & (ends > self.cursor) \
            & (ring.offsets[slot] < self.end)
        if held.any():
            self.cursor = max(self.cursor, int(ends[held].max()))
        control = ring.control
        self.share = float(control[CTRL_HOST_SHARE])
        self.kinds = int(control[CTRL_KINDS])
        self.device_pixels = min(max_pixels, int(control[CTRL_MAX_PIXELS]) or max_pixels)

    def __call__(self, data: bytes, row: int) -> None:
        from preprocess.jpeghead import HOST_TOO_BIG, ROUTE_DEVICE, ROUTE_NONE, route

        ring, slot = self.ring, self.slot
        ring.route[slot, row] = ROUTE_NONE
        where = route(data, self.kinds, self.device_pixels, self.share, int(ring.indices[slot, row]))
        n = len(data)
        if where == ROUTE_DEVICE and self.cursor + n > self.end:
            where = HOST_TOO_BIG
        if where == ROUTE_DEVICE:
            ring.arena(slot)[self.cursor:self.cursor + n] = memoryview(data)
            ring.offsets[slot, row], ring.lengths[slot, row] = self.cursor, n
            self.cursor += n
        else:
            ring.lengths[slot, row] = 0
            preprocess_into(data, ring.pixels(slot)[row], self.resize, self.interpolation, "exact",
                            max_pixels=self.max_pixels)
        ring.route[slot, row] = where


def pixel_limit(max_image_pixels: Optional[int]) -> int:
    """The decompression-bomb limit: the flag, else Pillow's own error threshold (the reference's).

    Pillow refuses images over `2 * Image.MAX_IMAGE_PIXELS` (178,956,970 by default) and only warns
    between that and `MAX_IMAGE_PIXELS`; the worker turns Pillow's check off and applies this one
    limit itself (`preprocess_into(max_pixels=...)`), so the flag can raise it as well as lower it.
    """
    from PIL import Image

    if max_image_pixels:
        return max_image_pixels
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 2 * 89478485


def resize_spec(text: str):
    """``--resize`` as engine/pool.py writes it: "256" (the shorter side) or "256,256" (h, w)."""
    values = tuple(int(v) for v in text.split(","))
    if len(values) not in (1, 2):
        raise ValueError(f"--resize takes N or H,W, got {text!r}")
    return values[0] if len(values) == 1 else values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="preprocess.worker")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--ring", required=True)
    p.add_argument("--slots", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--crop", type=int, nargs=2, required=True)
    p.add_argument("--resize", type=resize_spec, required=True, help="N (the shorter side) or H,W")
    p.add_argument("--interpolation", required=True)
    p.add_argument("--decode", required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--max-image-pixels", type=int, default=0, help="0: Pillow's limit")
    a = p.parse_args(argv)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent()
    try:
        import resource

        # No core file when a decoder crashes: the image is retried once and then failed with its
        # path, which is the reproducer. A core per crash of a big worker could fill the disk and
        # delay the parent's noticing (the process ends only once its core is written).
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
    if os.getppid() != a.parent:
        return 0  # the parent died before we armed PR_SET_PDEATHSIG
    faults = parse_faults(os.environ.get(FAULT_ENV))
    from PIL import Image

    max_pixels = pixel_limit(a.max_image_pixels)
    Image.MAX_IMAGE_PIXELS = None  # this process's own copy of Pillow: our limit replaces Pillow's
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    # Pillow's warnings about damaged metadata (EXIF, TIFF tags) of files that still decode: one
    # line each on stderr per worker, for nothing the report needs
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    conn = Connection(a.fd)
    device = a.decode == "device"  # compressed bytes into the ring's arena (BytePlacer)
    reader = ByteReader()  # this worker's open containers, kept between jobs
    ring = RingView.attach(a.ring, a.slots, a.batch, (a.crop[0], a.crop[1], 3), arena=-1 if device else 0)
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
            place = BytePlacer(ring, slot, rows, a.resize, a.interpolation, max_pixels) if device else None
            failures, error = run_job(ring, slot, rows, a.resize, a.interpolation, a.decode, max_pixels, faults,
                                      place, reader)
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

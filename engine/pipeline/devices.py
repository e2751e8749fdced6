"""`--devices`: one device process per device, behind the Backend interface (the scheduler does not change).

NOTE [Device processes]
=======================

 main process (this module)                       device process k (engine/pipeline/device_process.py)
 -------------------------------------------      ---------------------------------------------------
 dataset, decode pool, pixel cache, scheduler     its own backend: set_device(k), CUDA or NPU
 DeviceGroup.submit(batch) -> the free device     initialisation happen there, never here
   ("run", job, region, offset) -------------->   view of the ring slot / the cache's mapped
                                                  file / a staging block -> backend.submit
   <------------------------------- ("copied")    the slot may go back to the workers
   <---------------------------------- ("done")   model; logits into its shared logits block
 reduce each batch exactly once                   a process that dies: its batches are redone

- Pixels reach a device process through shared memory only: the ring's block (mapped by name), the
  pixel cache's pixels file (mapped read-only), or, for an array in neither (a static-shape
  backend's padded short batch), a per-device staging block this side copies it into. Logits come
  back through a per-device shared block of `--inflight` slots. Only small tuples cross the socket.
- A batch goes to the alive device with the fewest batches in flight (at most `--inflight` each),
  so a slower device takes fewer.
- A device process that dies (SIGKILL, a segfault in a vendor library, a backend error): its
  batches not yet copied are submitted again to another device (their pixels are still in place);
  the ones it had copied raise `DeviceLost` from `result()`, and the scheduler decodes those again
  and submits them elsewhere (engine/pipeline/scheduler.py), so no image is lost or counted twice.
  When no device is left, `BackendError` stops the run (a partial report).
- The model is prepared once: device processes start one after another, so the first compiles
  into the compile cache (aie) and the others load the saved artifact.
- Every block this side creates carries the ring's name prefix and this pid: the next run's
  `cleanup_stale` removes them if this process is killed outright. Device processes die with us
  (PR_SET_PDEATHSIG) and on EOF.

(Over 500 lines on purpose: placing a batch, the replies, a device's loss and the redo of its
batches are one protocol under one lock; split in two, each half would depend on the other's
invariants.)
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Dict, List, Optional, Tuple

import numpy as np

from engine.backends.base import AllDevicesLost, Backend, BackendError, DeviceLost, InFlight
from engine.config import RunConfig, parse_devices
from engine.procs import usable_cores
from engine.pipeline.ring import NAME_PREFIX, SHM_DIR

RING_REGION = 0  # region ids: 0 the ring, 1 the pixel cache, 2 + k device k's staging block
CACHE_REGION = 1


def _address(a) -> int:
    return int(np.asarray(a).__array_interface__["data"][0])


class _Block:
    """A shared-memory block this process creates and unlinks (logits, staging)."""

    def __init__(self, tag: str, nbytes: int):
        from multiprocessing import shared_memory

        self.shm = shared_memory.SharedMemory(name=f"{NAME_PREFIX}{os.getpid()}-{tag}-{secrets.token_hex(4)}",
                                              create=True, size=max(1, nbytes))
        self.name = self.shm.name.lstrip("/")
        self.path = os.path.join(SHM_DIR, self.name)

    def close(self) -> None:
        shm, self.shm = self.shm, None  # type: ignore[assignment]
        if shm is not None:
            try:
                shm.close()
            except BufferError:
                pass
            try:
                shm.unlink()
            except FileNotFoundError:
                pass


class _Job(InFlight):
    """A batch submitted to the group: waits for its device's replies."""

    def __init__(self, group: "DeviceGroup", job_id: int, pixels: np.ndarray, n: int):
        self.group, self.id, self.pixels, self.n = group, job_id, pixels, n
        self.device: Optional["_Device"] = None
        self.slot = -1
        self.copied_event = threading.Event()
        self.done_event = threading.Event()
        self.logits: Optional[np.ndarray] = None
        self.failed: List[Tuple[int, str]] = []
        self.lost: Optional[str] = None  # why its device was lost after the copy
        self.submitted = 0.0

    def copied(self) -> None:
        self.copied_event.wait()

    def result(self) -> np.ndarray:
        self.done_event.wait()
        if self.lost is not None:
            raise DeviceLost(self.lost)
        assert self.logits is not None
        return self.logits

    def failed_rows(self) -> List[Tuple[int, str]]:
        return self.failed


class _Device:
    """The parent's handle on one device process."""

    def __init__(self, did: int, order: int):
        self.id, self.order = did, order
        self.proc: Optional[subprocess.Popen] = None
        self.conn: Optional[Connection] = None
        self.send_lock = threading.Lock()
        self.alive = False
        self.lost: Optional[str] = None
        self.jobs: Dict[int, _Job] = {}
        self.free_slots: List[int] = []
        self.logits: Optional[np.ndarray] = None
        self.logits_block: Optional[_Block] = None
        self.staging: Optional[np.ndarray] = None
        self.staging_block: Optional[_Block] = None
        self.mapped: Dict[int, Tuple[str, int]] = {}
        self.replies: "List" = []  # replies to synchronous requests (prepare, compute)
        self.reply_cond = threading.Condition()
        self.reader: Optional[threading.Thread] = None
        self.images = 0
        self.batches = 0
        self.busy_s = 0.0
        self.compute_only: Optional[float] = None
        self.compute_only_alone: Optional[float] = None
        self.latencies: List[float] = []  # of its last compute-only call (all devices at once)
        self.info: Dict = {}
        self.name = ""
        self.count: Optional[int] = None

    def send(self, msg) -> None:
        with self.send_lock:
            assert self.conn is not None
            self.conn.send(msg)


class DeviceGroup(Backend):
    """Several devices, one process each, as one backend: see NOTE [Device processes]."""

    def __init__(self, config: RunConfig):
        ids = parse_devices(config.backend.devices)
        if config.preprocess.decode == "device" and (ids is None or len(ids) > 1):
            raise BackendError("--decode device with several --devices is not supported yet: the GPU decoder "
                               "runs inside one backend; use --decode exact or fast with --devices, or one device")
        self._devices_text = config.backend.devices
        self.base = config.replace(devices="")
        super().__init__(self.base)
        self.name = config.backend.name
        self.per_device = config.pipeline.inflight
        self.devices: List[_Device] = []
        self._cond = threading.Condition()
        self._next = 0
        self._closing = False
        self._ring = None
        self._cache = None
        self._t0: Optional[float] = None
        self.lost: List[Dict] = []
        self.static_shape = False
        try:
            first = ids[0] if ids is not None else 0
            dev0 = self._start(first, 0)
            self.name = dev0.name
            if ids is None:  # --devices all: every device the backend reports, counted in device process 0
                if dev0.count is None:
                    raise BackendError(self._cannot_count())
                ids = tuple(range(dev0.count))
            if self.name in ("cpu",) and ids is not None:
                self._check_cpu(len(ids))
            for order, did in enumerate(ids[1:], start=1):
                self._start(did, order)
        except BaseException:
            self.close()
            raise
        self.device_count = len(self.devices)

    # -- starting ----------------------------------------------------------------------------
    def _cannot_count(self) -> str:
        return (f"--devices all: the {self.name} backend has no devices to count; name them, like --devices 0,1 "
                f"(on cpu each device process gets a share of the {usable_cores()} usable cores the decode "
                "workers leave)")

    def _check_cpu(self, n: int) -> None:
        spare = usable_cores() - self.base.pipeline.workers
        if not self.base.backend.threads and spare < n:
            print(f"warning: --devices: {n} cpu device processes share {max(spare, 0)} core(s) the workers leave "
                  "(one thread each)", file=sys.stderr)

    def _device_config(self, did: int, n_hint: int) -> RunConfig:
        cfg = self.base.replace(device=did, devices="")
        if cfg.backend.name == "cpu" or (cfg.backend.name == "auto" and self.name == "cpu"):
            threads = cfg.backend.threads or max(1, (usable_cores() - cfg.pipeline.workers) // max(1, n_hint))
            cfg = cfg.replace(threads=threads)
        return cfg

    def _start(self, did: int, order: int) -> _Device:
        from engine.pipeline.pool import _package_root

        dev = _Device(did, order)
        parent, child = socket.socketpair()
        env = dict(os.environ)
        root = _package_root()
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            dev.proc = subprocess.Popen([sys.executable, "-m", "engine.pipeline.device_process", "--fd",
                                         str(child.fileno())], pass_fds=(child.fileno(),), env=env, cwd=root)
        finally:
            child.close()
        dev.conn = Connection(parent.detach())
        n_hint = len(parse_devices(self.config_devices) or ()) or 1
        dev.send(("init", self._device_config(did, n_hint).to_dict(), did))
        hello = self._recv_startup(dev)
        _, dev.name, dev.count, _pid = hello
        dev.alive = True
        dev.reader = threading.Thread(target=self._read, args=(dev,), name=f"device-{did}", daemon=True)
        dev.reader.start()
        self.devices.append(dev)
        return dev

    @property
    def config_devices(self) -> str:
        return self._devices_text

    def _recv_startup(self, dev: _Device):
        assert dev.conn is not None and dev.proc is not None, "the device process was started"
        try:
            msg = dev.conn.recv()
        except (EOFError, OSError):
            rc = dev.proc.wait()
            raise BackendError(f"device {dev.id}: its process exited while starting (status {rc})") from None
        if msg[0] == "error":
            dev.proc.wait()
            raise BackendError(f"device {dev.id}: {_first_line(msg[2])}")
        return msg

    # -- replies -----------------------------------------------------------------------------
    def _read(self, dev: _Device) -> None:
        """The device's reader thread: its replies, and its death (EOF) seen at once."""
        why = None
        conn = dev.conn
        assert conn is not None, "the device process was started"
        try:
            while True:
                msg = conn.recv()
                kind = msg[0]
                if kind == "copied":
                    job = dev.jobs.get(msg[1])
                    if job is not None:
                        job.copied_event.set()
                elif kind == "done":
                    _, jid, rows, classes, failed = msg
                    self._done(dev, jid, rows, classes, failed)
                elif kind == "error":
                    why = f"its backend failed: {_first_line(msg[2])}"
                    break
                else:
                    with dev.reply_cond:
                        dev.replies.append(msg)
                        dev.reply_cond.notify_all()
        except (EOFError, OSError):
            pass
        self._lose(dev, why)

    def _done(self, dev: _Device, jid: int, rows: int, classes: int, failed) -> None:
        with self._cond:
            job = dev.jobs.pop(jid, None)
            if job is None:
                return
            assert dev.logits is not None
            job.logits = np.array(dev.logits[job.slot, :rows, :classes])
            job.failed = [tuple(f) for f in failed]
            dev.free_slots.append(job.slot)
            dev.images += job.n
            dev.batches += 1
            dev.busy_s += time.monotonic() - job.submitted
            self._cond.notify_all()
        job.copied_event.set()
        job.done_event.set()

    def _lose(self, dev: _Device, why: Optional[str]) -> None:
        """A device process is gone: its batches not yet copied go to another device, the copied
        ones are redone by the scheduler (DeviceLost)."""
        rc = None
        if dev.proc is not None:
            try:
                rc = dev.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                dev.proc.kill()
                rc = dev.proc.wait()
        with self._cond:
            was_alive, dev.alive = dev.alive, False
            jobs = list(dev.jobs.values())
            dev.jobs.clear()
            if was_alive and not self._closing:
                from engine.pipeline.pool import _describe_exit

                dev.lost = why or f"its process {_describe_exit(rc)}"
                self.lost.append({"id": dev.id, "reason": dev.lost, "batches_redone": len(jobs)})
                print(f"warning: device {dev.id} lost ({dev.lost}); its {len(jobs)} batch(es) in flight are "
                      "redone on the other devices", file=sys.stderr)
            self._cond.notify_all()
        with dev.reply_cond:
            dev.reply_cond.notify_all()
        for job in jobs:
            if job.copied_event.is_set() or self._closing:
                job.lost = f"device {dev.id} lost: {dev.lost}"
                job.done_event.set()
            else:  # its pixels are still in place: another device takes it now
                threading.Thread(target=self._resubmit, args=(job,), daemon=True).start()

    def _resubmit(self, job: _Job) -> None:
        try:
            self._place(job)
        except BackendError as e:
            job.lost = str(e)
            job.copied_event.set()
            job.done_event.set()

    # -- the Backend interface ---------------------------------------------------------------
    def _request(self, dev: _Device, msg, want: str):
        dev.send(msg)
        with dev.reply_cond:
            while not dev.replies and dev.alive:
                dev.reply_cond.wait(0.5)
            if not dev.replies:
                raise BackendError(f"device {dev.id} lost: {dev.lost}")
            reply = dev.replies.pop(0)
        assert reply[0] == want, reply
        return reply

    def _alive(self) -> List[_Device]:
        alive = [d for d in self.devices if d.alive]
        if not alive:
            raise AllDevicesLost("every device process was lost: " +
                                 "; ".join(f"device {d['id']}: {d['reason']}" for d in self.lost))
        return alive

    def prepare(self, batch_size: int) -> None:
        """Prepare the model on every device, one after another: the first compiles (into the
        compile cache where the backend has one), the others load what it saved."""
        self.batch_size = batch_size
        classes = self.config.data.num_classes
        for dev in self._alive():
            _, static, info = self._request(dev, ("prepare", batch_size), "prepared")
            self.static_shape = static
            dev.info = info
            slots = self.per_device
            if dev.logits_block is not None:
                dev.logits_block.close()
            dev.logits_block = _Block(f"dev{dev.id}-logits", slots * batch_size * classes * 4)
            dev.logits = np.ndarray((slots, batch_size, classes), np.float32, dev.logits_block.shm.buf)
            dev.free_slots = list(range(slots))
            dev.send(("logits", dev.logits_block.name, slots, batch_size, classes))
            if dev.staging_block is not None:
                dev.staging_block.close()
                dev.staging_block, dev.staging = None, None

    def register_ring(self, ring) -> None:
        self._ring = ring
        for dev in self._alive():
            self._map(dev, RING_REGION, os.path.join(SHM_DIR, ring.name), ring.nbytes)

    def unregister_host_memory(self) -> None:
        self._ring = None

    def register_pixel_cache(self, cache) -> None:
        self._cache = cache

    def _map(self, dev: _Device, rid: int, path: str, nbytes: int) -> None:
        if dev.mapped.get(rid) != (path, nbytes):
            dev.send(("map", rid, path, nbytes))
            dev.mapped[rid] = (path, nbytes)

    def _locate(self, dev: _Device, pixels: np.ndarray) -> Optional[Tuple[int, int]]:
        """(region, offset) of `pixels` in memory the device process maps, or None."""
        if not pixels.flags.c_contiguous:
            return None
        at, size = _address(pixels), pixels.nbytes
        if self._ring is not None:
            base = _address(np.frombuffer(self._ring.buffer(), np.uint8))
            if base <= at and at + size <= base + self._ring.nbytes:
                self._map(dev, RING_REGION, os.path.join(SHM_DIR, self._ring.name), self._ring.nbytes)
                return RING_REGION, at - base
        mapping = self._cache.mapping() if self._cache is not None else None
        if mapping is not None:
            path, base, nbytes = mapping
            if base <= at and at + size <= base + nbytes:
                self._map(dev, CACHE_REGION, path, nbytes)
                return CACHE_REGION, at - base
        return None

    def _stage(self, dev: _Device, slot: int, pixels: np.ndarray) -> Tuple[int, int]:
        """Copy an array that is in no shared region into the device's staging block."""
        rows = pixels.shape[0]
        if dev.staging is None or dev.staging.shape[1] < rows:
            if dev.staging_block is not None:
                dev.staging_block.close()
            shape = (self.per_device, max(rows, self.batch_size)) + tuple(self.spec.shape)
            dev.staging_block = _Block(f"dev{dev.id}-staging", int(np.prod(shape)))
            dev.staging = np.ndarray(shape, np.uint8, dev.staging_block.shm.buf)
        dev.staging[slot, :rows] = pixels
        rid = 2 + dev.order
        assert dev.staging_block is not None
        self._map(dev, rid, dev.staging_block.path, dev.staging.nbytes)
        return rid, slot * dev.staging[0].nbytes

    def submit(self, pixels: np.ndarray) -> InFlight:
        with self._cond:
            self._next += 1
            job = _Job(self, self._next, pixels, pixels.shape[0])
        if self._t0 is None:
            self._t0 = time.monotonic()
        self._place(job)
        return job

    def _place(self, job: _Job) -> None:
        """Give `job` to the alive device with the fewest batches in flight (waits for a place)."""
        with self._cond:
            while True:
                free = [d for d in self._alive() if d.free_slots and len(d.jobs) < self.per_device]
                if free:
                    dev = min(free, key=lambda d: (len(d.jobs), d.order))
                    break
                self._cond.wait(0.5)
            job.device, job.slot = dev, dev.free_slots.pop(0)
            job.submitted = time.monotonic()
            dev.jobs[job.id] = job
        try:
            where = self._locate(dev, job.pixels)
            if where is None:
                where = self._stage(dev, job.slot, job.pixels)
            rows = job.pixels.shape[0]
            dev.send(("run", job.id, where[0], where[1], rows, job.n, job.slot))
        except (OSError, ValueError):
            pass  # the device just died: its reader thread hands the job on (_lose)

    def compute_only(self, batch_size: int, iterations: int, warmup: int = 1) -> List[float]:
        """Every device at once, each on a batch of its own already on the device. Returns the host's
        latencies: per call, batch / (the sum of the devices' rates), so batch / mean is the
        concurrent sum; each device's own figure is in `devices_report()`."""
        alive = self._alive()
        for dev in alive:
            dev.send(("compute", batch_size, iterations, warmup))
        per = []
        for dev in alive:
            with dev.reply_cond:
                while not dev.replies and dev.alive:
                    dev.reply_cond.wait(0.5)
                if not dev.replies:
                    continue
                reply = dev.replies.pop(0)
            lat = list(reply[1])
            dev.latencies = lat
            dev.compute_only = batch_size / float(np.mean(lat)) if lat else None
            per.append(lat)
        if not per:
            self._alive()
        n = min(len(p) for p in per)
        return [1.0 / sum(1.0 / max(p[i], 1e-12) for p in per) for i in range(n)]

    def compute_only_alone(self, batch_size: int, iterations: int) -> None:
        """Each device's compute-only figure measured alone (the others idle): what ais_bench sums."""
        for dev in self._alive():
            lat = self._request(dev, ("compute", batch_size, max(1, iterations), 1), "latencies")[1]
            dev.compute_only_alone = batch_size / float(np.mean(lat)) if lat else None

    def devices_report(self, wall_s: float) -> List[Dict]:
        """One object per device: id, images, compute_only (all devices at once), compute_only_alone,
        end_to_end (its images over the run's wall time), and why it was lost."""
        out = []
        for d in self.devices:
            out.append({"id": d.id, "images": d.images, "batches": d.batches,
                        "compute_only": d.compute_only, "compute_only_alone": d.compute_only_alone,
                        "end_to_end": d.images / wall_s if wall_s > 0 else 0.0,
                        "lost": d.lost})
        return out

    def describe(self) -> Dict:
        first = next((d.info for d in self.devices if d.info), {})
        info = dict(first, backend=self.name, device=f"{len(self.devices)} device processes",
                    devices=[d.id for d in self.devices], device_processes=True)
        info["devices_lost"] = list(self.lost)
        return info

    def stopping(self) -> None:
        """A stop signal: device processes are ended by `close()` (also while one is compiling)."""
        self._closing = True

    def close(self) -> None:
        self._closing = True
        for dev in self.devices:
            if dev.conn is not None:
                try:
                    dev.send(None)
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + 5.0
        for dev in self.devices:
            if dev.proc is not None:
                try:
                    dev.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    dev.proc.kill()
                    dev.proc.wait()
            if dev.conn is not None:
                dev.conn.close()
            if dev.reader is not None and dev.reader is not threading.current_thread():
                dev.reader.join(timeout=2)
            for block in (dev.logits_block, dev.staging_block):
                if block is not None:
                    block.close()
            dev.logits = dev.staging = None
            dev.logits_block = dev.staging_block = None


def _first_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    # a traceback's last line says what failed; a message's first line says it
    if lines and lines[0].startswith("Traceback"):
        return lines[-1][:500]
    return (lines[0] if lines else "")[:500]

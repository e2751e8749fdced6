"""The `cuda` backend, and `StreamBackend`, which `npu` (torch_npu) shares: torch's stream/event API.

Per batch (NOTE "slot ownership" in engine/pipeline/ring.py for when the slot is free again):

    copy stream:     H2D of the uint8 NHWC batch -> event `copied`
    compute stream:  wait(copied) -> InputAdapter + model (fp16/bf16, channels_last)
                     -> logits to float32 -> D2H into pinned host memory -> event `done`
    host:            InFlight.copied() = copied.synchronize()   (the slot may be reused)
                     InFlight.result() = done.synchronize()     (logits on the host)

The ring's shared memory is registered as pinned memory (`cudaHostRegister`), so the H2D copy
reads the slot directly and asynchronously. Where registration is not possible (or on npu),
the slot is first copied into a pinned staging buffer. Events are created with blocking sync,
so a waiting executor thread sleeps instead of spinning on a core the decode workers need.

With `--cuda-graphs` the model is captured once as a CUDA graph for the prepared batch size and
replayed per batch (static shape: the scheduler pads a short last batch and drops the padding).

With `--decode device` the backend owns a `DeviceDecodeStage` (engine/backends/decodestage.py: a
third stream, its lock, the JPEG decoder, the host fallback, the meter); `submit_batch` hands it an
`EncodedBatch` and runs the model on the `DecodedBatch` it returns.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np
import torch

from engine.backends.base import Backend, BackendError, HostBuffers, InFlight, timed_calls
from engine.models.zoo import InputAdapter, WithInput, build_model

if TYPE_CHECKING:  # imported by prepare() only for --decode device
    from engine.backends.decodestage import DecodeTiming, DeviceDecodeStage

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _StreamBatch(InFlight):
    def __init__(self, backend: "StreamBackend", copied, done, out: torch.Tensor, staging, keep):
        self.backend, self.copied_event, self.done_event, self.out = backend, copied, done, out
        self.staging = staging
        self.keep = keep  # device tensors that must outlive the enqueued work
        self.failed: List[Tuple[int, str]] = []  # --decode device: rows neither decoder could decode
        self.decode_timing: Optional["DecodeTiming"] = None  # --decode device: for the stage's meter (decodestage.py)

    def copied(self) -> None:
        self.copied_event.synchronize()
        if self.staging is not None:
            assert self.backend._staging is not None
            self.backend._staging.release(self.staging)
            self.staging = None

    def result(self) -> np.ndarray:
        self.copied()
        self.done_event.synchronize()
        self.keep = None
        stage = self.backend.decode_stage
        if self.decode_timing is not None and stage is not None:  # once: result() may be called again
            stage.meter.add(self.decode_timing)
            self.decode_timing = None
        return self.out.numpy()

    def failed_rows(self) -> List[Tuple[int, str]]:
        return self.failed


class StreamBackend(Backend):
    """A device with streams and events in torch's `torch.cuda` shape (cuda, and npu via torch_npu)."""

    name = "cuda"
    device_type = "cuda"
    has_events = True
    supports_graphs = True

    # ---- what differs between devices (a test overrides these to run the logic on the CPU) ----

    def _device_module(self):
        if not torch.cuda.is_available():
            raise BackendError("--backend cuda: torch.cuda.is_available() is False "
                               f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                               "use --backend cpu or auto")
        return torch.cuda

    def _host_register(self, ptr: int, size: int) -> bool:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(ptr, size, 0)
        if int(err) != 0:
            print(f"warning: cudaHostRegister of the ring ({size / 2**20:.0f} MiB) failed with error "
                  f"{int(err)}; staging batches through pinned buffers instead", file=sys.stderr)
            return False
        return True

    def _host_unregister(self, ptr: int) -> None:
        torch.cuda.cudart().cudaHostUnregister(ptr)

    def _pinned_empty(self, shape, dtype) -> torch.Tensor:
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:  # no pinned allocator: pageable (copies then block the host)
            return torch.empty(shape, dtype=dtype)

    def _record_stream(self, t: torch.Tensor, stream) -> None:
        t.record_stream(stream)

    def _new_event(self):
        return self.dm.Event(blocking=True)

    def _tune(self) -> None:
        torch.backends.cudnn.benchmark = True

    # ---- setup ------------------------------------------------------------------------------

    def device_count_available(self):
        return int(self.dm.device_count())

    def __init__(self, config):
        super().__init__(config)
        if config.backend.precision not in DTYPES:
            raise BackendError(f"--precision {config.backend.precision} is not supported on {self.name}")
        if config.backend.cuda.graphs and not self.supports_graphs:
            raise BackendError(f"--cuda-graphs is for --backend cuda, not {self.name}")
        if config.backend.cuda.graphs and config.backend.shape == "dynamic":
            raise BackendError("--cuda-graphs captures one batch size: use --shape static")
        self.dm = self._device_module()
        count = self.dm.device_count()
        if not 0 <= config.backend.device < count:
            raise BackendError(f"--device {config.backend.device}: this machine has {count} {self.device_type} "
                               f"device(s) (0..{count - 1})")
        self.device = torch.device(self.device_type, config.backend.device)
        self.dm.set_device(self.device)
        self.dtype = DTYPES[config.backend.precision]
        self.use_graphs = bool(config.backend.cuda.graphs)
        self.static_shape = self.use_graphs
        self.copy_stream = self.dm.Stream(device=self.device)
        self.compute_stream = self.dm.Stream(device=self.device)
        self._lock = threading.Lock()  # enqueueing on the compute stream (graph buffers are shared)
        self._registered: Optional[Tuple[int, int]] = None
        self.host_memory = "pinned staging"  # until the ring is registered
        self._staging: Optional[HostBuffers] = None  # made in prepare(), used where the ring is not pinned
        self.model = None
        self.graph = None
        self.info: Dict = {}
        # --decode device: JPEGs decoded on a third stream by the stage made in prepare()
        # (engine/backends/decodestage.py)
        self.decode_stage: Optional["DeviceDecodeStage"] = None
        if self.spec.decode == "device":
            from engine.backends.gpudecode import DecodeRefused, check_cuda_runtime

            try:
                if self.name != "cuda":
                    raise DecodeRefused(f"--decode device is for --backend cuda, not {self.name}")
                if self.device_type == "cuda":
                    check_cuda_runtime(torch.version.cuda)
            except DecodeRefused as e:
                raise BackendError(str(e)) from None

    decodes_jpeg = True  # takes EncodedBatch (--decode device) through submit_batch

    @property
    def jpeg(self):
        """The device JPEG decoder (`gpudecode.JpegDecoder`) of --decode device, else None."""
        return self.decode_stage.decoder if self.decode_stage is not None else None

    @jpeg.setter
    def jpeg(self, decoder) -> None:  # a test swaps in another decoder after prepare()
        assert self.decode_stage is not None, "prepare() for --decode device first"
        self.decode_stage.decoder = decoder

    @property
    def decode_meter(self):
        """The device decoder's meter (`decodestage.DecodeMeter`), else None."""
        return self.decode_stage.meter if self.decode_stage is not None else None

    def prepare(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._tune()
        net, self.info = build_model(self.config)
        net = net.to(self.device).to(self.dtype)
        try:
            net = net.to(memory_format=torch.channels_last)
        except Exception:  # a TorchScript module may refuse; the input is channels_last anyway
            pass
        adapter = InputAdapter(self.spec.mean, self.spec.std, self.dtype)
        self.model = WithInput(adapter, net).to(self.device).eval()
        h, w, c = self.spec.shape
        self._shape = (batch_size, h, w, c)
        self._staging = HostBuffers(lambda: self._pinned_empty(self._shape, torch.uint8), self.config.pipeline.inflight + 1)
        # warm up on the compute stream: cudnn.benchmark picks its algorithms, and a TorchScript
        # model's profiling executor finishes optimising (compiling fused kernels) before any capture
        x = torch.zeros(self._shape, dtype=torch.uint8, device=self.device)
        with self.dm.stream(self.compute_stream):
            for _ in range(3):
                self._forward(x)
        self.compute_stream.synchronize()
        self.graph = None
        if self.use_graphs:
            self._capture(x)
        if self.spec.decode == "device" and self.decode_stage is None:
            from engine.backends.decodestage import DeviceDecodeStage
            from engine.backends.gpudecode import DecodeRefused, _filter, make_decoder

            try:
                _filter(self.spec.interpolation)
                decoder = make_decoder(self.config.device_decode.jpeg_decoder, self.device)
            except DecodeRefused as e:
                raise BackendError(str(e)) from None
            self.decode_stage = DeviceDecodeStage(self.dm, self.device, decoder, self.spec.resize,
                                                  self.spec.interpolation, self.config.device_decode.resize,
                                                  self.config.pipeline.max_image_pixels, self._new_event)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # no_grad rather than inference_mode: TorchScript (--ts) models and fusers are safe under it
        with torch.no_grad():
            return self.model(x)

    def _capture(self, x: torch.Tensor) -> None:
        self.static_x = x
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.no_grad(), torch.cuda.graph(graph, stream=self.compute_stream):
                self.static_y = self.model(self.static_x).float()
        except Exception as e:
            raise BackendError(f"--cuda-graphs: capturing the model failed ({type(e).__name__}: {str(e)[:300]}); "
                               "run without --cuda-graphs")
        self.graph = graph

    # ---- host memory ------------------------------------------------------------------------

    def register_host_memory(self, buffer) -> None:
        arr = np.frombuffer(buffer, dtype=np.uint8)
        ptr, size = int(arr.ctypes.data), int(arr.nbytes)
        del arr  # hold no export of the shared memory, or the ring cannot be closed
        try:
            ok = self._host_register(ptr, size)
        except Exception as e:
            print(f"warning: cannot register the ring as pinned memory ({e}); staging through pinned buffers",
                  file=sys.stderr)
            ok = False
        self._registered = (ptr, size) if ok else None
        self.host_memory = "registered ring" if ok else "pinned staging"

    def _in_registered(self, pixels: np.ndarray) -> bool:
        """The batch lies in the registered (pinned) ring, so the H2D copy may read it directly."""
        if self._registered is None:
            return False
        ptr, size = self._registered
        at = int(pixels.ctypes.data)
        return ptr <= at and at + pixels.nbytes <= ptr + size

    def unregister_host_memory(self) -> None:
        if self._registered is not None:
            ptr, _ = self._registered
            self._registered = None
            try:
                self.dm.synchronize()  # no copy may still read the ring
                self._host_unregister(ptr)
            except Exception as e:
                print(f"warning: unregistering the ring's pinned memory failed: {e}", file=sys.stderr)

    # ---- running ----------------------------------------------------------------------------

    def _check_batch(self, shape) -> None:
        if self.model is None:
            raise BackendError(f"{self.name}: prepare(batch_size) must run before submit")
        b, h, w, c = self._shape
        if tuple(shape[1:]) != (h, w, c):
            raise BackendError(f"{self.name}: batch of {tuple(shape)} images, prepared for {(h, w, c)}")
        if not 1 <= shape[0] <= b or (self.static_shape and shape[0] != b):
            raise BackendError(f"{self.name}: batch of {shape[0]} images, prepared for "
                               f"{b if self.static_shape else '1..%d' % b}")

    def submit(self, pixels: np.ndarray) -> InFlight:
        self._check_batch(pixels.shape)
        n = pixels.shape[0]
        host = torch.from_numpy(pixels)
        staging = None
        if not self._in_registered(pixels):  # not a ring slot: a pixel-cache slice (a mapped file)
            assert self._staging is not None, "prepare() first"
            staging = self._staging.acquire()
            staging[:n].copy_(host)
            host = staging[:n]
        with self.dm.stream(self.copy_stream):
            x = torch.empty(host.shape, dtype=torch.uint8, device=self.device)
            x.copy_(host, non_blocking=True)
            copied = self._new_event()
            copied.record(self.copy_stream)
        out, done, y = self._enqueue_model(x, copied)
        return _StreamBatch(self, copied, done, out, staging, (x, y))

    def _enqueue_model(self, x, copied):
        """The model on the compute stream once `copied` (the event after which the device batch
        `x` is complete, on whichever stream made it) has fired, and its logits D2H into pinned
        memory. Returns (pinned logits, done event, device logits to keep alive)."""
        n = x.shape[0]
        out = self._pinned_empty((n, self.config.data.num_classes), torch.float32)
        with self._lock, self.dm.stream(self.compute_stream):
            self.compute_stream.wait_event(copied)
            self._record_stream(x, self.compute_stream)  # x was allocated on another stream
            if self.graph is not None:
                self.static_x.copy_(x)
                self.graph.replay()
                y = self.static_y
            else:
                y = self._forward(x).float()
            if y.shape != out.shape:
                raise BackendError(f"{self.name}: the model returned {tuple(y.shape)} for a batch of {n}; "
                                   f"expected {tuple(out.shape)} (check --model / --ts and num_classes)")
            out.copy_(y, non_blocking=True)
            done = self._new_event()
            done.record(self.compute_stream)
        return out, done, y

    def submit_batch(self, batch) -> InFlight:
        if getattr(batch, "arena", None) is None:
            return self.submit(batch.pixels)
        return self._submit_encoded(batch)

    def _submit_encoded(self, batch) -> InFlight:
        """An `EncodedBatch` (--decode device): the stage decodes it on its stream, then the model
        runs on the compute stream once the decoded batch is complete."""
        if self.decode_stage is None:
            from engine.backends.gpudecode import DecodeRefused

            raise DecodeRefused(f"{self.name}: prepare() ran without --decode device")
        self._check_batch(batch.pixels.shape)
        dec = self.decode_stage.decode(batch, self._shape[1:])
        out, done, y = self._enqueue_model(dec.x, dec.copied)  # x was made on the decode stream
        job = _StreamBatch(self, dec.copied, done, out, None, (dec.x, y))
        job.failed = dec.failed
        job.decode_timing = dec.timing
        return job

    def compute_only(self, batch_size: int, iterations: int, warmup: int = 1) -> List[float]:
        """The model alone on a batch already on the device; each call ends in a device synchronize."""
        self._check_batch((batch_size,) + self._shape[1:])
        x = torch.randint(0, 256, (batch_size,) + self._shape[1:], dtype=torch.uint8, device=self.device)
        if self.graph is not None:
            self.static_x.copy_(x)

            def call():
                with self.dm.stream(self.compute_stream):
                    self.graph.replay()
        else:
            def call():
                with self.dm.stream(self.compute_stream):
                    self._forward(x)
        return timed_calls(call, self.dm.synchronize, iterations, warmup)

    def describe(self) -> Dict:
        try:
            device_name = self.dm.get_device_name(self.device)
        except Exception:
            device_name = str(self.device)
        return dict(self.info, backend=self.name, device=str(self.device), device_name=device_name,
                    precision=self.config.backend.precision, channels_last=True, graphs=self.graph is not None,
                    host_memory=self.host_memory,
                    streams="copy + compute, events" + (" + decode" if self.decode_stage is not None else ""),
                    **(self.decode_stage.describe() if self.decode_stage is not None else {}))

    def close(self) -> None:
        self.unregister_host_memory()
        self.graph = None
        self.model = None
        self._staging = None


class CudaBackend(StreamBackend):
    name = "cuda"

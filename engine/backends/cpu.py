"""The CPU backend: torch on the host. The "copy" is a memcpy out of the ring slot (so the slot is
free at once); normalisation from uint8 runs inside the model call, in channels_last."""

from __future__ import annotations

import threading
from typing import Dict, List

import numpy as np
import torch

from engine.backends.base import Backend, BackendError, InFlight, timed_calls
from engine.models.zoo import InputAdapter, WithInput, build_model
from engine.procs import usable_cores


class _CpuBatch(InFlight):
    def __init__(self, backend: "CpuBackend", x: torch.Tensor):
        self.backend, self.x = backend, x

    def result(self) -> np.ndarray:
        return self.backend._forward(self.x).float().numpy()


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, config):
        super().__init__(config)
        if config.backend.precision == "fp16":
            raise BackendError("--precision fp16 is not supported on the cpu backend; use fp32 or bf16")
        self._lock = threading.Lock()  # one forward at a time: the threads are already all in use
        self.model = None
        self.info: Dict = {}
        self.threads = config.backend.threads or max(1, usable_cores() - config.pipeline.workers)

    def prepare(self, batch_size: int) -> None:
        self.batch_size = batch_size
        torch.set_num_threads(self.threads)
        net, self.info = build_model(self.config)
        dtype = torch.bfloat16 if self.config.backend.precision == "bf16" else torch.float32
        if dtype != torch.float32:
            net = net.to(dtype)
        adapter = InputAdapter(self.spec.mean, self.spec.std, dtype)
        self.model = WithInput(adapter, net.to(memory_format=torch.channels_last)).eval()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._lock, torch.inference_mode():
            return self.model(x)

    def submit(self, pixels: np.ndarray) -> InFlight:
        return _CpuBatch(self, torch.from_numpy(np.array(pixels, copy=True)))

    def compute_only(self, batch_size: int, iterations: int, warmup: int = 1) -> List[float]:
        h, w, c = self.spec.shape
        x = torch.randint(0, 256, (batch_size, h, w, c), dtype=torch.uint8)
        return timed_calls(lambda: self._forward(x), lambda: None, iterations, warmup)

    def describe(self) -> Dict:
        return dict(self.info, backend=self.name, device="cpu", threads=self.threads,
                    precision=self.config.backend.precision)

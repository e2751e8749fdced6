"""The `npu` backend: torch_npu (Ascend's PyTorch adapter, PyPI `torch-npu`), eager mode.

torch_npu mirrors `torch.cuda` (`torch.npu.Stream`, `Event`, `synchronize`, pinned host memory),
so this is `StreamBackend` (engine/backends/cuda.py) on device type "npu": a copy stream and a
compute stream joined by events, uint8 NHWC in, InputAdapter + model on the device. torch_npu
is imported here, when the backend is created, never at package import.

Differences from cuda: no `cudaHostRegister` equivalent is used, so every batch is staged through
a pinned buffer (torch_npu provides the pinned allocator); no cudnn; no graph capture. Not
tested on hardware here: kept line for line with the cuda path.
"""

from __future__ import annotations

import torch

from engine.backends.base import BackendError
from engine.backends.cuda import StreamBackend


class NpuBackend(StreamBackend):
    name = "npu"
    device_type = "npu"
    supports_graphs = False

    def _device_module(self):
        try:
            import torch_npu  # noqa: F401  (registers torch.npu and the "npu" device)
        except ImportError as e:
            raise BackendError(f"--backend npu needs torch_npu (pip install torch-npu matching torch "
                               f"{torch.__version__}, after CANN); import failed: {e}")
        dm = getattr(torch, "npu", None)
        if dm is None or not dm.is_available():
            raise BackendError("--backend npu: torch_npu imported but no NPU is available "
                               "(check the driver, CANN's set_env.sh and ASCEND_RT_VISIBLE_DEVICES)")
        return dm

    def _host_register(self, ptr: int, size: int) -> bool:
        return False  # stage through pinned buffers

    def _host_unregister(self, ptr: int) -> None:
        pass

    def _tune(self) -> None:
        pass

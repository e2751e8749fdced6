"""The `aie` backend: torch_aie (Ascend-cann-torch-aie / MindIE-Torch) on an Ascend NPU.

Written against the API in shared/TORCH_AIE.md and tested against the stand-in in
tests/fakes/torch_aie. What it does:

- compiles `WithInput(InputAdapter, model)`, traced to TorchScript, so the raw NHWC batch goes
  to the device and the float conversion, layout change and normalisation run in the compiled
  graph. The input is uint8 where the stack accepts it (tried first; the documented `Input`
  dtypes are FLOAT, FLOAT16, INT32, INT64, BOOL), else float16 pixel values 0..255, still
  unnormalised (exact in float16). Which one, and why, is in `describe()`.
- static shapes (`--shape static`): one batch size; the scheduler pads a short last batch to it
  (`static_shape = True`) and drops the padding. `--shape dynamic`: a range 1..B, no padding.
- compiled modules are cached on disk (engine/models/compile_cache.py), keyed by the model's bytes and
  every compile option; a second run loads instead of compiling.
- copies run on one stream and the model on another. torch_aie has no events, so the host knows a
  copy has finished only by `synchronize()`, which blocks: `InFlight.copied()` synchronises the
  copy stream, then enqueues the model on the compute stream; `InFlight.result()` synchronises the
  compute stream and brings the logits back. The scheduler calls both in executor threads.
- host staging buffers are pinned where `Tensor.pin_memory()` works (asynchronous copies; the
  ring slot is free once staged), pageable otherwise (the copy completes inside `submit`).
- `torch_aie.finalize()` runs once per process, at exit (nothing works after it, and a process
  may use several backends one after another, as `run-bench --e2e` does).
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from engine import __version__
from engine.backends.base import Backend, BackendError, HostBuffers, InFlight, timed_calls
from engine.models.compile_cache import CompileCache, cache_key
from engine.models.catalog import is_timm
from engine.models.zoo import (InputAdapter, WithInput, build_model, file_sha256, model_name, preprocessing_of,
                               quiet_jit, resolve_weights)

# --precision -> torch_aie.PrecisionPolicy member name
POLICIES = {"fp16": "FP16", "fp32": "FP32"}
# tried in this order; the first that torch_aie accepts is used
INPUT_DTYPES: Tuple[Tuple[str, torch.dtype], ...] = (("uint8", torch.uint8), ("float16", torch.float16))

_RUNTIME = {"finalize_registered": False, "finalized": False}
_RUNTIME_LOCK = threading.Lock()


def import_torch_aie():
    """torch_aie, or a BackendError that says how to get it."""
    try:
        import torch_aie  # noqa: F401
    except ImportError as e:
        raise BackendError(f"--backend aie needs torch_aie (install CANN, then the Ascend torch_aie wheel); "
                           f"import failed: {e}")
    return torch_aie


def finalize_runtime() -> None:
    """`torch_aie.finalize()`, once per process (registered with atexit by the first backend)."""
    with _RUNTIME_LOCK:
        if _RUNTIME["finalized"]:
            return
        _RUNTIME["finalized"] = True
    mod = sys.modules.get("torch_aie")
    if mod is None:
        return
    try:
        mod.finalize()
    except Exception as e:  # at exit there is no one left to raise to
        print(f"warning: torch_aie.finalize() failed: {e}", file=sys.stderr)


def _register_finalize() -> None:
    with _RUNTIME_LOCK:
        if not _RUNTIME["finalize_registered"]:
            atexit.register(finalize_runtime)
            _RUNTIME["finalize_registered"] = True


def pinning_works() -> bool:
    """Whether this process can pin host memory (torch_aie alone often cannot)."""
    try:
        t = torch.empty(64, dtype=torch.uint8).pin_memory()
        return bool(t.is_pinned())
    except Exception:
        return False


class _AieBatch(InFlight):
    """One submitted batch: H2D enqueued on the copy stream; the model is enqueued in copied()."""

    def __init__(self, backend: "AieBackend", x, staging, n: int):
        self.backend, self.x, self.staging, self.n = backend, x, staging, n
        self.y = None
        self._lock = threading.Lock()

    def copied(self) -> None:
        with self._lock:
            if self.y is not None:
                return
            b = self.backend
            b.copy_stream.synchronize()  # no events: the only way to know the copy finished
            if self.staging is not None:
                assert b._staging is not None
                b._staging.release(self.staging)
                self.staging = None
            self.y = b._call(self.x)  # enqueued on the compute stream, returns at once
            self.x = None

    def result(self) -> np.ndarray:
        self.copied()
        b = self.backend
        b.compute_stream.synchronize()
        assert self.y is not None, "copied() enqueues the model"
        try:
            with b.aie.npu.stream(b.compute_stream):
                logits = self.y.to("cpu")  # blocking copy: synchronises the compute stream
        except Exception as e:
            raise BackendError(f"aie: copying the logits back failed: {type(e).__name__}: {e}")
        self.y = None
        return logits.float().numpy()


class AieBackend(Backend):
    name = "aie"
    has_events = False

    def device_count_available(self, limit: int = 64):
        """torch_aie has no device count: the ids `set_device` accepts, from 0 up (it raises on an
        invalid id); the current device is set back afterwards."""
        count = 0
        try:
            for k in range(limit):
                self.aie.set_device(k)
                count = k + 1
        except Exception:
            pass
        finally:
            self.aie.set_device(self.config.backend.device)
        return count

    def __init__(self, config):
        super().__init__(config)
        if config.backend.precision not in POLICIES:
            raise BackendError(f"--precision {config.backend.precision} is not supported on the aie backend; "
                               "use fp16 or fp32")
        self.aie = import_torch_aie()
        self.static_shape = config.backend.shape == "static"
        self.device = f"npu:{config.backend.device}"
        try:
            self.aie.set_device(config.backend.device)
        except Exception as e:
            raise BackendError(f"--device {config.backend.device}: torch_aie.set_device failed: {e}")
        _register_finalize()
        self.cache = CompileCache(config.backend.cache_dir, config.backend.use_cache)
        try:
            self.copy_stream = self.aie.npu.Stream(self.device)
            self.compute_stream = self.aie.npu.Stream(self.device)
        except Exception as e:
            raise BackendError(f"aie: cannot create streams on {self.device}: {e}")
        self.pinned = pinning_works()
        self.model = None
        self.input_dtype: Optional[torch.dtype] = None
        self._call_lock = threading.Lock()
        self._staging: Optional[HostBuffers] = None
        self._net = None  # the CPU model, built only on a cache miss
        self._model_info: Dict = {}
        self.info: Dict = {}

    # ---- preparing: identity, cache, compile -------------------------------------------------

    def _identity(self) -> Dict:
        """What the model is, by content: the cache key's first part; fills the report's model info."""
        cfg = self.config
        if cfg.model.ts:
            if not os.path.isfile(cfg.model.ts):
                raise BackendError(f"--ts {cfg.model.ts}: no such file")
            sha = file_sha256(cfg.model.ts)
            self._model_info = {"model": model_name(cfg), "source": "torchscript", "ts": cfg.model.ts, "sha256": sha,
                                "preset": preprocessing_of(cfg)}
            return {"kind": "torchscript", "sha256": sha}
        weights, _, _ = resolve_weights(cfg.model.name, cfg.model.weights)  # a tag becomes its file here, before the key
        family = "timm" if is_timm(cfg.model.name) else "torchvision"
        if weights is None:
            import torchvision

            self._model_info = {"model": cfg.model.name, "source": family, "weights": "random"}
            ident = {"kind": family, "model": cfg.model.name, "weights": "random (seed 0)",
                     "torch": torch.__version__, "torchvision": torchvision.__version__,
                     "num_classes": cfg.data.num_classes}
            if family == "timm":
                ident["timm"] = __import__("timm").__version__
            return ident
        if not os.path.isfile(weights):
            raise BackendError(f"--weights {weights}: no such file")
        sha = file_sha256(weights)
        self._model_info = {"model": cfg.model.name, "source": family, "weights": weights, "sha256": sha}
        return {"kind": family, "model": cfg.model.name, "weights_sha256": sha, "num_classes": cfg.data.num_classes}

    def _options(self, identity: Dict, dtype_name: str, batch_size: int) -> Dict:
        cfg, spec = self.config, self.spec
        h, w, _ = spec.shape
        return {
            "cache_format": 1,
            "engine": __version__,
            "model": identity,
            "input": {"dtype": dtype_name, "layout": "NHWC", "shape": cfg.backend.shape, "batch": batch_size,
                      "height": h, "width": w},
            "mean": list(spec.mean),
            "std": list(spec.std),
            "precision_policy": POLICIES[cfg.backend.precision],
            "soc_version": cfg.backend.aie.soc_version,
            "optimization_level": cfg.backend.aie.optimization_level,
            "torch_aie": str(getattr(self.aie, "__version__", "unknown")),
            "torch": torch.__version__,
        }

    def _input(self, dtype_name: str, batch_size: int):
        """The `torch_aie.Input` for NHWC batches of this dtype; raises if torch_aie refuses it."""
        aie = self.aie
        h, w, c = self.spec.shape
        members = {"uint8": "UINT8", "float16": "FLOAT16"}
        dtype = getattr(aie.dtype, members[dtype_name], None) or dict(INPUT_DTYPES)[dtype_name]
        kw = {"dtype": dtype}
        fmt = getattr(getattr(aie, "TensorFormat", None), "ND", None)
        if fmt is not None:
            kw["format"] = fmt  # NHWC is not NCHW: no layout hint
        if self.static_shape:
            return aie.Input((batch_size, h, w, c), **kw)
        return aie.Input(min_shape=(1, h, w, c), max_shape=(batch_size, h, w, c), **kw)

    def _traced(self, dtype: torch.dtype, batch_size: int):
        """TorchScript of adapter + model, traced on the CPU with an NHWC batch of `dtype`."""
        if self._net is None:
            self._net, info = build_model(self.config)
            self._model_info.update(info)
        h, w, c = self.spec.shape
        module = WithInput(InputAdapter(self.spec.mean, self.spec.std, torch.float32), self._net).eval()
        example = torch.randint(0, 256, (batch_size, h, w, c), dtype=torch.uint8).to(dtype)
        try:
            with torch.no_grad(), quiet_jit():
                return torch.jit.trace(module, example, check_trace=False)
        except Exception as e:
            raise BackendError(f"aie: tracing the model with a {tuple(example.shape)} {dtype} batch failed: "
                               f"{type(e).__name__}: {str(e)[:300]}")

    def _compile(self, ts, inp):
        policies = getattr(self.aie, "PrecisionPolicy", None) or self.aie._enums.PrecisionPolicy
        policy = getattr(policies, POLICIES[self.config.backend.precision])
        with quiet_jit():
            return self.aie.compile(ts, inputs=[inp], precision_policy=policy, soc_version=self.config.backend.aie.soc_version,
                                    optimization_level=self.config.backend.aie.optimization_level)

    def prepare(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.model = None
        self._staging = None
        identity = self._identity()
        notes: List[str] = []
        pending_refusal: Optional[Tuple[str, str]] = None
        for dtype_name, dtype in INPUT_DTYPES:
            options = self._options(identity, dtype_name, batch_size)
            key = cache_key(options)
            why = self.cache.refused(key)
            if why:
                notes.append(f"{dtype_name} input refused earlier (cached): {why}")
                continue
            try:
                inp = self._input(dtype_name, batch_size)
            except Exception as e:
                notes.append(f"{dtype_name} input refused by torch_aie.Input: {type(e).__name__}: {e}")
                continue
            t0 = time.perf_counter()
            model, how = self._load_cached(key), "hit"
            if model is None:
                how = "miss" if self.cache.enabled else "off"
                ts = self._traced(dtype, batch_size)
                print(f"aie: compiling ({self._what(batch_size)}, {dtype_name} input); "
                      + (f"cached in {self.cache.path(key)}" if self.cache.enabled else "not cached (--no-cache)"),
                      file=sys.stderr, flush=True)
                try:
                    model = self._compile(ts, inp)
                except Exception as e:
                    reason = f"{type(e).__name__}: {str(e)[:300]}"
                    if dtype_name != INPUT_DTYPES[-1][0]:
                        notes.append(f"{dtype_name} input refused by torch_aie.compile: {reason}")
                        pending_refusal = (key, reason)
                        continue
                    raise BackendError(f"aie: torch_aie.compile failed ({self._what(batch_size)}): {reason}")
                # the .json beside the artifact also keeps the preprocessing (not in the key: only the
                # crop's shape and the mean/std compile into the model, and those are in `options`)
                self.cache.store(key, lambda p, m=model: self._save(m, p),
                                 dict(options, preprocess=dataclasses.asdict(self.spec)))
            else:
                print(f"aie: compiled model from the cache: {self.cache.path(key)}", file=sys.stderr)
            if pending_refusal is not None:  # remembered only once another dtype compiled fine
                self.cache.remember_refusal(*pending_refusal)
            self.model, self.input_dtype = model, dtype
            self.info = {"cache": how, "cache_key": key, "cache_path": self.cache.path(key),
                         "prepare_s": round(time.perf_counter() - t0, 3),
                         "input_dtype": dtype_name,
                         "input_note": ("uint8 NHWC accepted" if dtype_name == "uint8" else
                                        "float16 pixel values 0..255 (unnormalised) NHWC, because "
                                        + "; ".join(notes))}
            break
        else:
            raise BackendError("aie: torch_aie accepted no input dtype: " + "; ".join(notes))
        if how == "hit" and self._model_info.get("weights") == "random":
            print(f"warning: no weights for {self.config.model.name} (give --weights FILE.pth); the cached "
                  "compiled model has random weights, so the accuracy means nothing", file=sys.stderr)
        h, w, c = self.spec.shape
        self._shape = (batch_size, h, w, c)
        self._staging = HostBuffers(self._new_staging, self.config.pipeline.inflight + 1)

    def _what(self, batch_size: int) -> str:
        batch = f"batch {batch_size}" if self.static_shape else f"batches 1..{batch_size}"
        return (f"{batch}, {self.config.backend.precision}, {self.config.backend.aie.soc_version}, "
                f"optimization level {self.config.backend.aie.optimization_level}")

    @staticmethod
    def _save(model, path: str) -> None:
        with quiet_jit():
            model.save(path)

    def _load_cached(self, key: str):
        path = self.cache.lookup(key)
        if path is None:
            return None
        try:
            with quiet_jit():
                return torch.jit.load(path).eval()
        except Exception as e:
            print(f"warning: cached compiled model {path} does not load ({type(e).__name__}: {str(e)[:200]}); "
                  "compiling again", file=sys.stderr)
            return None

    # ---- running ----------------------------------------------------------------------------

    def _new_staging(self) -> torch.Tensor:
        """A host staging buffer [B, H, W, 3] of the input dtype: pinned if possible."""
        buf = torch.empty(self._shape, dtype=self.input_dtype)
        return buf.pin_memory() if self.pinned else buf

    def _call(self, x):
        """Enqueue the compiled model on the compute stream; returns the (npu) output at once."""
        try:
            with self._call_lock, self.aie.npu.stream(self.compute_stream):
                return self.model(x)
        except Exception as e:  # errors inside TorchScript arrive as torch.jit.Error, not RuntimeError
            raise BackendError(f"aie: the compiled model failed on a {tuple(x.shape)} batch: "
                               f"{type(e).__name__}: {str(e)[:400]}")

    def _check_batch(self, shape: Tuple[int, ...]) -> None:
        if self.model is None:
            raise BackendError("aie: prepare(batch_size) must run before submit")
        b, h, w, c = self._shape
        if tuple(shape[1:]) != (h, w, c):
            raise BackendError(f"aie: batch of {tuple(shape)} images, the model was compiled for {(h, w, c)}")
        if self.static_shape and shape[0] != b:
            raise BackendError(f"aie: static model compiled for batch {b} got {shape[0]} images "
                               "(a short batch must be padded; or use --shape dynamic)")
        if not 1 <= shape[0] <= b:
            raise BackendError(f"aie: dynamic model compiled for batches 1..{b} got {shape[0]} images")

    def submit(self, pixels: np.ndarray) -> InFlight:
        self._check_batch(pixels.shape)
        n = pixels.shape[0]
        host = torch.from_numpy(pixels)
        staging = None
        buffers = self._staging
        if self.pinned or self.input_dtype != torch.uint8:
            assert buffers is not None, "prepare() first"
            staging = buffers.acquire()
            staging[:n].copy_(host)  # ring slot -> staging buffer (uint8, or float16 values 0..255)
            host = staging[:n]
        try:
            with self.aie.npu.stream(self.copy_stream):
                x = host.to(self.device, non_blocking=self.pinned)
        except Exception as e:
            if staging is not None and buffers is not None:
                buffers.release(staging)
            raise BackendError(f"aie: host-to-device copy failed: {type(e).__name__}: {e}")
        if not self.pinned and staging is not None and buffers is not None:
            buffers.release(staging)  # a pageable copy has finished when .to() returns
            staging = None
        return _AieBatch(self, x, staging, n)

    def compute_only(self, batch_size: int, iterations: int, warmup: int = 1) -> List[float]:
        """Latencies of the compiled model on a resident batch, each call ending in synchronize()."""
        b, h, w, c = self._shape
        self._check_batch((batch_size, h, w, c))
        x = torch.randint(0, 256, (batch_size, h, w, c), dtype=torch.uint8).to(self.input_dtype)
        with self.aie.npu.stream(self.copy_stream):
            xd = x.to(self.device)  # blocking: the copy stream is synchronised
        self.copy_stream.synchronize()
        return timed_calls(lambda: self._call(xd), self.compute_stream.synchronize, iterations, warmup)

    def describe(self) -> Dict:
        cfg = self.config
        return dict(self._model_info, backend=self.name, device=self.device, precision=cfg.backend.precision,
                    precision_policy=POLICIES[cfg.backend.precision], shape=cfg.backend.shape, compiled_batch=self.batch_size,
                    soc_version=cfg.backend.aie.soc_version, optimization_level=cfg.backend.aie.optimization_level,
                    host_memory="pinned" if self.pinned else "pageable", streams="copy + compute, synchronize()",
                    **self.info)

    def close(self) -> None:
        """Drop the model and buffers; `torch_aie.finalize()` itself runs at process exit."""
        self.model = None
        self._staging = None
        self._net = None

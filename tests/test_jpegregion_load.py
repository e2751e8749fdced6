"""The region decoder loads and decodes the same pixels when the process already holds another
libjpeg.so.62 (torchvision 0.15's wheel bundles one; a plain dlopen then binds to it)."""

from __future__ import annotations

import ctypes
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from preprocess import jpegregion

needs_decoder = pytest.mark.skipif(jpegregion.load() is None, reason=f"region decoder: {jpegregion.status()}")


def _jpeg() -> bytes:
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@needs_decoder
def test_undefined_symbol_falls_back_to_a_namespace_of_its_own(monkeypatch):
    """Force the plain dlopen to fail as it does beside torchvision 0.15: the namespace load works
    and its decoder gives the same pixels as the normal one."""
    real = ctypes.CDLL
    calls = []

    def failing_once(name, *a, **kw):
        if not calls and "handle" not in kw and name and "_jpegregion-" in str(name):
            calls.append(name)
            raise OSError(f"{name}: undefined symbol: jpeg_skip_scanlines, version LIBJPEG_6.2")
        return real(name, *a, **kw)

    path = jpegregion.library_path()
    monkeypatch.setattr(ctypes, "CDLL", failing_once)
    isolated = jpegregion.RegionDecoder(path)
    monkeypatch.setattr(ctypes, "CDLL", real)
    assert calls, "the plain load was not tried first"
    normal = jpegregion.load()
    data = _jpeg()
    out_a = np.zeros((224, 224, 3), np.uint8)
    out_b = np.zeros((224, 224, 3), np.uint8)
    from preprocess import decode

    # the decoder the hot path uses is swapped for the isolated one for one decode
    monkeypatch.setattr(decode, "_REGION", isolated)
    decode.preprocess_into(data, out_a, 256, "bilinear", "fast")
    monkeypatch.setattr(decode, "_REGION", normal)
    decode.preprocess_into(data, out_b, 256, "bilinear", "fast")
    assert out_a.any() and np.array_equal(out_a, out_b)


@needs_decoder
def test_loads_after_torchvision_io():
    pytest.importorskip("torchvision")
    code = ("import torchvision.io\nfrom preprocess import jpegregion\n"
            "assert jpegregion.load() is not None, jpegregion.status()\nprint(jpegregion.status())")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.startswith("region decoder on libjpeg-turbo")

"""The key of a pixel cache folder: every input that decides the pixels (the preprocessing, the
decoders of this process down to the hash of Pillow's compiled core, the decompression-bomb limit)
and which data the pixels are of. Two runs share a folder only when their keys are equal."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional, Tuple

from engine.files import file_sha256
from engine.pipeline.pixelcache.format import FORMAT_VERSION

CACHE_ENV = "IMAGENET_ENGINE_CACHE"
PIXEL_PATH_VERSION = 1


def default_pixel_cache_dir() -> str:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "imagenet-engine")
    return os.path.join(base, "pixels")


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover
        return None
    try:
        return metadata.version(name)
    except Exception:
        return None


def _file_sha256(path: str) -> str:
    try:
        return file_sha256(path)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"


def _pair(v) -> List[int]:
    if isinstance(v, (tuple, list)):
        return [int(x) for x in v]
    return [int(v)]


_IDENTITY: Dict[str, Dict[str, object]] = {}


def decoder_identity(mode: str) -> Dict[str, object]:
    """Everything about the decoders of this process that can change a pixel (computed once per mode)."""
    if mode not in _IDENTITY:
        _IDENTITY[mode] = _decoder_identity(mode)
    return json.loads(json.dumps(_IDENTITY[mode]))


def _decoder_identity(mode: str) -> Dict[str, object]:
    import PIL
    from PIL import features

    from preprocess import decode, jpegregion

    # as scripts/setup-env.sh tells them apart; the hash of PIL's compiled core also tells an
    # AVX2 build from an SSE4 one, and any rebuild
    flavour = "simd" if _dist_version("pillow-simd") and not _dist_version("pillow") else "stock"
    try:
        from PIL import _imaging

        imaging = _file_sha256(_imaging.__file__)
    except Exception as e:  # pragma: no cover - PIL without its core does not decode at all
        imaging = f"unknown ({e})"
    try:
        turbo = features.version("libjpeg_turbo")
    except Exception:
        turbo = None
    try:
        jpeg = features.version("jpg")
    except Exception:
        jpeg = None
    region = jpegregion.load()
    ident: Dict[str, object] = {
        "pillow": PIL.__version__,
        "pillow_flavour": flavour,
        "pillow_core_sha256": imaging,
        "pillow_libjpeg": jpeg,
        "pillow_libjpeg_turbo": turbo,
        "simplejpeg": _dist_version("simplejpeg") if getattr(decode, "simplejpeg", None) is not None else None,
        "decoder": decode.decoder(mode),
        "region_decoder": None,
    }
    if region is not None:
        ident["region_decoder"] = {
            "turbo": region.turbo_version,
            "abi": getattr(jpegregion, "ABI", None),
            "sha256": _file_sha256(str(region.path)),
        }
    return ident


def pixel_key(spec, max_image_pixels: Optional[int], data_root: str) -> Dict[str, object]:
    """The key of a cache folder: what decides the pixels, and which data folder they are from."""
    return {
        "format": FORMAT_VERSION,
        "pixel_path_version": PIXEL_PATH_VERSION,
        "resize": _pair(spec.resize),
        "crop": _pair(spec.crop),
        "shape": list(_shape_of(spec)),
        "interpolation": spec.interpolation,
        "decode": spec.decode,
        "max_image_pixels": _effective_limit(max_image_pixels),
        "decoders": decoder_identity(spec.decode),
        "data": os.path.realpath(data_root),
    }


def _effective_limit(max_image_pixels: Optional[int]) -> int:
    """The decompression-bomb limit the workers apply (the flag, else Pillow's threshold), so that
    no flag and the flag at Pillow's default share a cache."""
    from preprocess.worker import pixel_limit

    return int(pixel_limit(max_image_pixels))


def _shape_of(spec) -> Tuple[int, int, int]:
    return tuple(int(x) for x in spec.shape)  # type: ignore[return-value]


def _key_hash(key: Dict[str, object]) -> str:
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]

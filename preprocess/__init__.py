"""The hot path: pure functions from encoded bytes to pixels, run inside worker processes.

numpy and PIL only; nothing under ``preprocess/`` imports torch.
"""

from preprocess.decode import INTERPOLATIONS, MODES, DecodeError, open_rgb, preprocess_into
from preprocess.geometry import center_crop_box, crop_padding, crop_placement, resized_size

__all__ = [
    "DecodeError",
    "INTERPOLATIONS",
    "MODES",
    "center_crop_box",
    "crop_padding",
    "crop_placement",
    "open_rgb",
    "preprocess_into",
    "resized_size",
]

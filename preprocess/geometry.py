"""Resize and centre-crop arithmetic, identical to torchvision's.

Pure integer/float arithmetic on sizes; nothing here touches pixels. Each
function names the torchvision code it mirrors (torchvision 0.29.1
``transforms/functional.py``; the formulas are unchanged since 0.8, when the
PIL path still carried its own copy, which returned early when the shorter
side already had the requested size: the same result).

Conventions: PIL order ``(width, height)`` for image sizes and for the
returned resize size (what ``Image.resize`` takes); torchvision order
``(height, width)`` for a requested resize pair and for crop sizes, as in
``Resize((h, w))`` and ``CenterCrop((h, w))``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

__all__ = ["resized_size", "center_crop_box", "crop_padding", "crop_placement"]

ResizeSpec = Union[int, Sequence[int]]


def resized_size(
    width: int, height: int, size: ResizeSpec, max_size: Optional[int] = None
) -> Tuple[int, int]:
    """Return ``(new_w, new_h)``, the size ``Resize(size, max_size)`` gives.

    ``size`` is an int (or a 1-sequence) for the shorter side, the longer
    side scaled by the same ratio and truncated, ``int(size * long / short)``;
    or a ``(h, w)`` pair used as is. Mirrors
    ``torchvision.transforms.functional._compute_resized_output_size``. When
    the result equals ``(width, height)`` torchvision returns the image
    untouched; callers skip the resize the same way.
    """
    if isinstance(size, int):
        size = [size]
    if len(size) == 1:
        requested_new_short = int(size[0])
        short, long = (width, height) if width <= height else (height, width)
        new_short = requested_new_short
        new_long = int(requested_new_short * long / short)
        if max_size is not None:
            if max_size <= requested_new_short:
                raise ValueError(
                    f"max_size = {max_size} must be strictly greater than the requested "
                    f"size for the smaller edge size = {requested_new_short}"
                )
            if new_long > max_size:
                new_short, new_long = int(max_size * new_short / new_long), max_size
        if width <= height:
            return new_short, new_long
        return new_long, new_short
    if len(size) == 2:
        if max_size is not None:
            raise ValueError(
                "max_size can only be used when size gives the shorter side (an int), "
                f"not with the pair {tuple(size)}"
            )
        return int(size[1]), int(size[0])
    raise ValueError(f"size must be an int or a 1 or 2 element sequence, got {size!r}")


def center_crop_box(width: int, height: int, crop_h: int, crop_w: int) -> Tuple[int, int, int, int]:
    """Return the ``(left, top, right, bottom)`` box ``CenterCrop((crop_h, crop_w))`` takes.

    In the coordinates of the ``width x height`` image; ``right - left ==
    crop_w`` and ``bottom - top == crop_h``. Where the crop is larger than
    the image along an axis the box reaches outside it (negative ``left`` or
    ``top``), and the outside is zeros: exactly the padding of
    :func:`crop_padding`. Mirrors ``torchvision.transforms.functional
    .center_crop``: pad ``(crop - size) // 2`` before and ``(crop - size + 1)
    // 2`` after, then start at ``int(round((size - crop) / 2.0))`` along any
    axis not padded (Python's round: halves go to the even integer).
    """
    left = _crop_start(width, crop_w)
    top = _crop_start(height, crop_h)
    return left, top, left + crop_w, top + crop_h


def crop_padding(width: int, height: int, crop_h: int, crop_w: int) -> Tuple[int, int, int, int]:
    """Return ``(pad_left, pad_top, pad_right, pad_bottom)``, the zeros ``center_crop`` adds.

    All zero when the crop fits inside the image. Same formulas as
    torchvision's ``padding_ltrb`` in ``center_crop``.
    """
    return (
        (crop_w - width) // 2 if crop_w > width else 0,
        (crop_h - height) // 2 if crop_h > height else 0,
        (crop_w - width + 1) // 2 if crop_w > width else 0,
        (crop_h - height + 1) // 2 if crop_h > height else 0,
    )


def crop_placement(
    width: int, height: int, crop_h: int, crop_w: int
) -> Tuple[Tuple[int, int, int, int], Tuple[int, int]]:
    """Return ``(src_box, (dst_x, dst_y))`` for writing a centre crop into a buffer.

    ``src_box`` is the part of the image inside the crop, clipped to the
    image, as a PIL box ``(left, top, right, bottom)``; it lands at
    ``(dst_x, dst_y)`` in the ``crop_h x crop_w`` output, whose other pixels
    are zero (the padding). This is :func:`center_crop_box` intersected with
    the image.
    """
    left, top, right, bottom = center_crop_box(width, height, crop_h, crop_w)
    src = (max(left, 0), max(top, 0), min(right, width), min(bottom, height))
    return src, (src[0] - left, src[1] - top)


def _crop_start(size: int, crop: int) -> int:
    """Start of the crop along one axis (negative when padded), as torchvision computes it."""
    if crop > size:
        # Padded axis: after padding the image is exactly `crop` long and
        # torchvision's crop starts at 0 of the padded image.
        return -((crop - size) // 2)
    return int(round((size - crop) / 2.0))

"""Warp a patch out of a larger image with one ``cv2.remap``, cutting only the region it reads.

:func:`axis_cut` finds, per axis, the slice of the source a map reads (plus the interpolation
footprint) and how much reflection padding it needs at a true image border; the region is
padded once with ``cv2.copyMakeBorder`` (``BORDER_REFLECT_101``, repeated as often as
needed) and remapped with a constant border that is never read. This is 1.6x (edge) to 2.3x
(corner) faster than letting remap reflect pixel by pixel, and avoids OpenCV 5.0.0's cubic
remap, which misreads more than one reflection outside the image (``docs/augmentations.md``).
:func:`remap_image` warps images of any dtype and channel count to float32;
:func:`remap_mask` copies integer labels of any width with nearest-neighbour sampling.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

PAD = cv2.BORDER_REFLECT_101  # the image border: padded before the warp, never by remap
INSIDE = cv2.BORDER_CONSTANT  # remap reads only inside the padded region (see axis_cut)


def axis_cut(lo: float, hi: float, n: int, margin: int) -> tuple[int, int, int, int]:
    """What a warp reads along one axis of length ``n``: cut ``[start, stop)``, then pad.

    The warp reads source indices ``floor(lo) - margin .. floor(hi) + margin``. Returns
    ``(start, stop, before, after)``: the slice of the image to cut and the pixels to add
    before and after it by ``REFLECT_101``, so that the padded slice holds every index read.
    Padding happens only at a true image border (``before > 0`` implies ``start == 0``,
    ``after > 0`` implies ``stop == n``), and the slice includes every pixel a reflection
    there copies (the whole axis when both ends reflect, or when reflecting several times).
    """
    a, b = math.floor(lo) - margin, math.floor(hi) + margin
    c, d = a, b
    if a < 0:
        d = max(d, -a)  # REFLECT_101 about 0 copies indices 1 .. -a
    if d > n - 1:
        c = min(c, 2 * (n - 1) - d)  # reflection about n - 1
    if c < 0 and d > n - 1:
        c, d = 0, n - 1  # reflections at both ends (or several): the whole axis
    return max(c, 0), min(d, n - 1) + 1, max(0, -a), max(0, b - (n - 1))


def pad_reflect(src: np.ndarray, pads: tuple[int, int, int, int]) -> np.ndarray:
    """``src`` (h, w) or (h, w, k) extended by ``pads`` = (top, bottom, left, right), pixels,
    with ``REFLECT_101`` (no copy when every pad is 0)."""
    return cv2.copyMakeBorder(src, *pads, PAD) if any(pads) else src


def remap_image(
    region: np.ndarray,
    pads: tuple[int, int, int, int],
    map_x: np.ndarray,
    map_y: np.ndarray,
    interpolation: int,
) -> np.ndarray:
    """Pad and warp a (C, h, w) region of any dtype to float32 (C, P, P), 4 channels per call."""
    if region.shape[0] == 1:
        src = pad_reflect(region[0].astype(np.float32, copy=False), pads)
        return cv2.remap(src, map_x, map_y, interpolation, borderMode=INSIDE)[None]
    out = np.empty((region.shape[0],) + map_x.shape, dtype=np.float32)
    for c0 in range(0, region.shape[0], 4):  # cv2 interleaves at most 4 channels portably
        group = np.ascontiguousarray(region[c0 : c0 + 4].transpose(1, 2, 0), dtype=np.float32)
        warped = cv2.remap(pad_reflect(group, pads), map_x, map_y, interpolation, borderMode=INSIDE)
        out[c0 : c0 + 4] = warped.reshape(map_x.shape + (-1,)).transpose(2, 0, 1)
    return out


def remap_mask(
    region: np.ndarray, pads: tuple[int, int, int, int], map_x: np.ndarray, map_y: np.ndarray
) -> np.ndarray:
    """Pad and nearest-neighbour warp an integer (h, w) mask, exact for every integer dtype.

    cv2.remap has no 32/64-bit integer support, so the label bytes are viewed as 1, 2 or 4
    uint16 planes (uint8 for 1-byte labels) and copied, never interpolated.
    """
    plane = np.uint8 if region.dtype.itemsize == 1 else np.uint16
    planes = region.dtype.itemsize // np.dtype(plane).itemsize
    src = (region if planes == 1 else np.ascontiguousarray(region)).view(plane)
    if planes > 1:
        src = src.reshape(region.shape + (planes,))
    out = cv2.remap(pad_reflect(src, pads), map_x, map_y, cv2.INTER_NEAREST, borderMode=INSIDE)
    return np.ascontiguousarray(out).reshape(map_x.shape[0], -1).view(region.dtype)


__all__ = ["INSIDE", "PAD", "axis_cut", "pad_reflect", "remap_image", "remap_mask"]

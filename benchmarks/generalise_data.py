"""Evaluation sets of ``benchmarks/generalise.py``: re-encodings, dsb2018, empty fields, Otsu.

Everything here is fixed before any model is scored (no parameter was chosen on test images):

- **re-encodings** of a raw image ``x`` ``(1, H, W)`` (:data:`REENCODINGS`): the same scene as
  another acquisition would record it. ``8-bit``: ``round(255 (x - min) / (max - min))`` as
  uint8 (what "save as 8-bit" does with the full range); ``gain x0.25``/``x4``: ``round(g x)``
  as uint16; ``offset +500``: uint16; ``offset -500``: float32, negative values kept (a
  float recording; clipping at 0 would erase the background, which is not an affine change);
  ``gamma 0.7``/``1.4``: ``round(m (x / m) ** g)`` with ``m = max(x)``, uint16; ``noise``:
  ``x + N(0, s)`` with ``s = 0.02 (p99.8 - p1)`` of the image, float32, seeded per image.
- **dsb2018 fluorescence** images (``metadata.csv`` modality ``fluorescence``) minus the fields
  that are also bbbc039 images (thumbnail correlation >= 0.99: 16 of them, same wells re-saved
  as 8-bit); every 10th of the rest by sorted id is the *dev* subset used to choose settings,
  the others are the held-out cross-dataset set (c).
- **dev empty fields**: 128 x 128 windows of bbbc039 *training* images that hold no nucleus
  pixel within 8 px (one per image that has one), for choosing settings without the test
  split's empty fields.
- **dev emptied dsb2018**: the dsb2018 dev images with their nuclei replaced by background
  (:func:`scarce.data.empty.empty_field`, seeded per image; images under 20 % background are
  left out): empty fields from other microscopes, which no training image resembles (the
  dev empty fields above come from the training images, which ``augment.empty_field_p``
  empties during training).
- **Otsu + distance-transform watershed**, the classical floor: Gaussian smoothing
  (sigma 1 px), Otsu threshold, holes filled, objects < 20 px removed, markers at maxima of
  the distance transform at least 7 px apart (about half a bbbc039 nucleus radius), watershed
  of the negative distance inside the foreground.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.morphology import remove_small_objects
from skimage.segmentation import relabel_sequential, watershed
from skimage.transform import resize

from scarce.data.empty import empty_field
from scarce.io import list_image_files, read_image

NOISE_FRACTION = 0.02  # added noise std, fraction of the image's p1..p99.8 range
DEV_EVERY = 10  # every 10th non-duplicate dsb2018 fluorescence image (sorted id) is dev
EMPTY_WINDOW = 128  # side of a dev empty field, pixels
EMPTY_MARGIN = 8  # distance of a dev empty field from any nucleus, pixels
DUPLICATE_CORRELATION = 0.99  # thumbnail correlation above which two fields are the same


def _eight_bit(x: np.ndarray, rng) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return np.round(255.0 * (x.astype(np.float64) - lo) / max(hi - lo, 1e-12)).astype(np.uint8)


def _gain(g: float):
    return lambda x, rng: np.round(x.astype(np.float64) * g).astype(np.uint16)


def _offset(b: float):
    if b >= 0:
        return lambda x, rng: (x.astype(np.int64) + int(b)).astype(np.uint16)
    return lambda x, rng: x.astype(np.float32) + np.float32(b)


def _gamma(g: float):
    def apply(x: np.ndarray, rng) -> np.ndarray:
        m = float(x.max())
        return np.round(m * (x.astype(np.float64) / m) ** g).astype(np.uint16)

    return apply


def _noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    lo, hi = np.percentile(x, [1.0, 99.8])
    sigma = NOISE_FRACTION * float(hi - lo)
    return (x.astype(np.float32) + rng.normal(0.0, sigma, x.shape)).astype(np.float32)


REENCODINGS = {
    "8-bit": _eight_bit,
    "gain x0.25": _gain(0.25),
    "gain x4": _gain(4.0),
    "offset +500": _offset(500),
    "offset -500": _offset(-500),
    "gamma 0.7": _gamma(0.7),
    "gamma 1.4": _gamma(1.4),
    "noise": _noise,
}


def reencode(pairs: list, name: str, seed: int = 0) -> list:
    """``pairs`` ``[(stem, image (1, H, W), truth (H, W))]`` with every image re-encoded."""
    fn = REENCODINGS[name]
    return [
        (stem, fn(image, np.random.default_rng([seed, i])), truth)
        for i, (stem, image, truth) in enumerate(pairs)
    ]


def _thumb(image: np.ndarray) -> np.ndarray:
    t = resize(image[0].astype(np.float64), (52, 70), anti_aliasing=True).ravel()
    t -= t.mean()
    return t / (np.linalg.norm(t) + 1e-12)


def dsb2018_sets(dsb_root: Path, bbbc_root: Path) -> dict:
    """``{"dev": [ids], "held_out": [ids], "duplicates": [ids]}`` of dsb2018 fluorescence."""
    with open(dsb_root / "metadata.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["modality"] == "fluorescence"]
    ids = sorted(r["id"] for r in rows)
    shape = read_image(list_image_files(bbbc_root / "images")[0]).shape[1:]
    bbbc = np.stack([_thumb(read_image(f)) for f in list_image_files(bbbc_root / "images")])
    duplicates = []
    for r in rows:
        if (int(r["height"]), int(r["width"])) == shape:
            corr = bbbc @ _thumb(read_image(dsb_root / "images" / f"{r['id']}.png"))
            if corr.max() >= DUPLICATE_CORRELATION:
                duplicates.append(r["id"])
    rest = [i for i in ids if i not in set(duplicates)]
    dev = rest[::DEV_EVERY]
    return {
        "dev": dev,
        "held_out": [i for i in rest if i not in set(dev)],
        "duplicates": sorted(duplicates),
    }


def dev_empty_fields(pairs: list) -> list:
    """One nucleus-free ``EMPTY_WINDOW``-square crop per training image that has one."""
    out, s = [], EMPTY_WINDOW
    for stem, image, truth in pairs:
        near = ndi.binary_dilation(truth > 0, iterations=EMPTY_MARGIN)
        ii = np.pad(near.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        window = ii[s:, s:] - ii[:-s, s:] - ii[s:, :-s] + ii[:-s, :-s]
        free = np.argwhere(window == 0)
        if len(free):
            y, x = free[len(free) // 2]
            crop = np.ascontiguousarray(image[:, y : y + s, x : x + s])
            out.append((f"{stem}_empty", crop, np.zeros((s, s), dtype=np.int32)))
    return out


def emptied_fields(pairs: list, seed: int = 0) -> list:
    """``pairs`` with every nucleus replaced by background, truth all 0 (see the module)."""
    out = []
    for i, (stem, image, truth) in enumerate(pairs):
        empty = empty_field(image, truth > 0, np.random.default_rng([seed, i]))
        if empty is not None:
            out.append((f"{stem}_emptied", empty, np.zeros_like(truth)))
    return out


def otsu_watershed(image: np.ndarray, *, min_size: int = 20, min_distance: int = 7) -> np.ndarray:
    """Instances ``(H, W)`` int32 of a raw fluorescence image ``(C, H, W)`` (channel 0)."""
    x = gaussian(image[0].astype(np.float64), sigma=1.0)
    fg = x > threshold_otsu(x)
    fg = remove_small_objects(ndi.binary_fill_holes(fg), min_size=min_size)
    dist = ndi.distance_transform_edt(fg)
    regions, _ = ndi.label(fg)
    peaks = peak_local_max(dist, min_distance=min_distance, labels=regions, exclude_border=False)
    markers = np.zeros(fg.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=fg)
    return relabel_sequential(labels.astype(np.int32))[0]

"""Synthetic section defects with known truth: cracks, folds and missing data.

Each generator takes a real slice ``(H, W)`` and returns the damaged slice, its defect mask and
the displacement field that made it, ``damaged = warp(slice, field)`` outside the defect (the
pull convention of :mod:`scarce.models.field`: ``damaged(y, x) = slice(y + dy, x + dx)``).
Inside a crack or a fold the truth is a tear, so evaluations skip a band around defects.
Used three ways: to train the defect detector (a Scarce segmentation model), to train the
aligner on defects, and to benchmark.

Mask classes (:data:`CLASSES`): 0 normal, 1 crack, 2 fold, 3 missing data.

References
----------
E. Mitchell et al., arXiv:1904.02643 (2019), and seung-lab/SEAMLeSS ``training/aug.py``
(``crack``: a seam walks down the section, the two sides are pulled apart and the gap filled).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from scarce.models.field import warp

CLASSES = ("normal", "crack", "fold", "missing")
CRACK, FOLD, MISSING = 1, 2, 3


@dataclass(frozen=True)
class Defect:
    """A damaged slice and its truth.

    Attributes
    ----------
    image : ndarray, shape (H, W), float32
        The damaged slice (same value range as the input).
    mask : ndarray, shape (H, W), uint8
        :data:`CLASSES` index per pixel.
    field : ndarray, shape (2, H, W), float32
        ``damaged = warp(slice, field)`` outside the defect, pixels (dy, dx).
    """

    image: np.ndarray
    mask: np.ndarray
    field: np.ndarray


def _fill(rng: np.random.Generator, image: np.ndarray, dark: bool | None = None) -> float:
    """A fill value: near the dark or the light end of the slice's intensities."""
    lo, hi = np.percentile(image, (1, 99))
    dark = bool(rng.random() < 0.5) if dark is None else dark
    return float(lo if dark else hi)


def seam(
    height: int, width: int, rng: np.random.Generator, *, c: float | None = None
) -> np.ndarray:
    """A crack's seam: one column per row, a random walk from the top row to the bottom.

    It starts in the middle half of the width; at each row it steps one column left or right,
    each with probability ``p / 2`` where ``p = 1 / c`` and ``c`` ~ U[3, 10] (straighter seams
    for larger c), staying inside the slice.

    Returns
    -------
    ndarray, shape (H,), int64
        The seam's column in every row.
    """
    c = float(rng.uniform(3, 10)) if c is None else c
    p = 1.0 / c
    steps = rng.choice([-1, 0, 1], size=height, p=[p / 2, 1 - p, p / 2])
    start = int(rng.integers(width // 4, 3 * width // 4))
    return np.clip(start + np.cumsum(steps) - steps[0], 1, width - 2).astype(np.int64)


def crack(image: np.ndarray, rng: np.random.Generator, *, width: float | None = None) -> Defect:
    """A crack: the section tore along a seam and its two sides moved apart.

    The left side moves left by ``a`` and the right side right by ``w - a`` (``w`` ~ U[4, 32]
    px, ``a`` ~ U[0, w]); the gap of width ``w`` along the seam is filled dark or light.

    Parameters
    ----------
    image : ndarray, shape (H, W)
    rng : numpy.random.Generator
    width : float, optional
        The pull-apart width ``w``, pixels.
    """
    h, w_img = image.shape
    w = float(rng.uniform(4, 32)) if width is None else float(width)
    a = float(rng.uniform(0, w))
    columns = seam(h, w_img, rng)
    xx = np.arange(w_img)[None, :]
    left = xx < columns[:, None] - a  # pixels that now show the left side
    right = xx >= columns[:, None] + (w - a)  # pixels that now show the right side
    field = np.zeros((2, h, w_img), np.float32)
    field[1][left] = a  # damaged(y, x) = slice(y, x + a): content moved left by a
    field[1][right] = -(w - a)
    damaged = _warp(image, field)
    mask = np.where(left | right, 0, CRACK).astype(np.uint8)
    damaged[mask == CRACK] = _fill(rng, image)
    return Defect(damaged, mask, field)


def fold(image: np.ndarray, rng: np.random.Generator, *, band: float | None = None) -> Defect:
    """A fold: a band of tissue folded over itself into a narrow dark stripe.

    Along a random line, a band of width ``b`` (~ U[10, 40] px) collapses into a stripe of
    width ``s`` (2-6 px): the content under the band is lost, the content beyond it moves
    towards the line by ``b - s``, and the stripe is dark (the doubled tissue).
    """
    h, w = image.shape
    b = float(rng.uniform(10, 40)) if band is None else float(band)
    s = float(rng.uniform(2, 6))
    theta = rng.uniform(0, np.pi)
    normal = np.array([np.cos(theta), np.sin(theta)])  # (ny, nx)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    centre = np.array([rng.uniform(h / 4, 3 * h / 4), rng.uniform(w / 4, 3 * w / 4)])
    distance = (yy - centre[0]) * normal[0] + (xx - centre[1]) * normal[1]  # signed, pixels
    beyond = distance >= s
    field = np.zeros((2, h, w), np.float32)
    shift = b - s  # damaged(p) = slice(p + (b - s) n) beyond the stripe
    field[0][beyond], field[1][beyond] = shift * normal[0], shift * normal[1]
    damaged = _warp(image, field)
    stripe = (distance >= 0) & (distance < s)
    damaged[stripe] = _fill(rng, image, dark=True)
    mask = np.where(stripe, FOLD, 0).astype(np.uint8)
    return Defect(damaged, mask, field)


def missing(image: np.ndarray, rng: np.random.Generator, *, value: float | None = None) -> Defect:
    """Missing data: a smooth blob (debris, a hole) set to one constant; the field is zero."""
    h, w = image.shape
    noise = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=min(h, w) / 16)
    threshold = np.quantile(noise, 1 - rng.uniform(0.02, 0.15))
    region = noise > threshold
    damaged = image.astype(np.float32).copy()
    damaged[region] = _fill(rng, image) if value is None else value
    return Defect(
        damaged, np.where(region, MISSING, 0).astype(np.uint8), np.zeros((2, h, w), np.float32)
    )


GENERATORS = {"crack": crack, "fold": fold, "missing": missing}


def random_defect(image: np.ndarray, rng: np.random.Generator, kinds=("crack", "fold", "missing")):
    """One defect of a kind drawn uniformly from ``kinds`` (see :data:`GENERATORS`)."""
    kind = kinds[int(rng.integers(len(kinds)))]
    return GENERATORS[kind](image, rng)


def _warp(image: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Bilinear pull of a ``(H, W)`` slice by a ``(2, H, W)`` field, border values outside."""
    t = torch.from_numpy(image.astype(np.float32))[None, None]
    out = warp(t, torch.from_numpy(field)[None], padding="border")
    return out[0, 0].numpy()


def defect_weights(
    mask: np.ndarray | torch.Tensor,
    radius: int,
    *,
    near: float,
    inside: float,
) -> torch.Tensor:
    """SEAMLeSS's ternary mask turned into loss weights.

    ``M = 2`` inside a defect (any class > 0), ``1`` within ``radius`` px of one (a square
    neighbourhood, as SEAMLeSS's max-pool dilation), ``0`` elsewhere; the weight is ``inside``,
    ``near`` and 1 respectively.

    Parameters
    ----------
    mask : array, shape (N, 1, H, W) or (H, W)
        Defect classes (0 = normal).
    radius : int
        ``mask_neighborhood_radius``, pixels.
    near, inside : float
        ``lambda_*_near`` and ``lambda_*_in``.

    Returns
    -------
    Tensor, shape (N, 1, H, W), float32
    """
    m = torch.as_tensor(mask).float()
    m = m.reshape(1, 1, *m.shape) if m.ndim == 2 else m
    defect = (m > 0).float()
    dilated = (
        torch.nn.functional.max_pool2d(defect, 2 * radius + 1, 1, radius) if radius else defect
    )
    ternary = defect + dilated  # 2 inside, 1 near, 0 elsewhere
    weights = torch.ones_like(ternary)
    weights[ternary == 1] = near
    weights[ternary == 2] = inside
    return weights


def make_defect_dataset(stack, out_dir, *, per_slice: int = 4, seed: int = 0) -> dict:
    """Write a segmentation dataset of synthetic defects on a stack's slices.

    ``out_dir/images/*.tif`` (damaged slices, the stack's dtype range as float32) and
    ``out_dir/masks/*.tif`` (uint8 :data:`CLASSES`), ``per_slice`` damaged copies of every slice
    (kinds drawn uniformly, sometimes two defects on one copy) plus the clean slice, and
    ``dataset.yaml`` with the class names. Train on it with ``scarce ingest`` + ``scarce train``
    (``scarce defects-train`` does both).

    Parameters
    ----------
    stack : path-like
        A stack (see :func:`scarce.align.stack.open_stack`).
    out_dir : path-like
        Created; must not exist.
    per_slice : int
        Damaged copies per slice.
    seed : int
        Seed of the generators.

    Returns
    -------
    dict
        ``images``, ``masks`` (folders), ``samples`` and the pixel count per class.

    Raises
    ------
    scarce.errors.OutputExistsError
        If ``out_dir`` exists.
    scarce.errors.WriteError
        If the disk is full or read-only; nothing is left under ``out_dir`` (the dataset is
        written to a temporary folder beside it and renamed when whole).
    """
    import tifffile
    import yaml

    from scarce.align.stack import open_stack
    from scarce.data.install import install_folder

    final = Path(out_dir)
    (st,) = open_stack(stack)[:1]
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(CLASSES), np.int64)
    samples = 0
    with install_folder(final) as out:  # built beside its final name, renamed when whole
        (out / "images").mkdir()
        (out / "masks").mkdir()
        for z in range(len(st)):
            image = st.slice(z).astype(np.float32)
            for copy in range(per_slice + 1):
                if copy == 0:
                    damaged, mask = image, np.zeros(image.shape, np.uint8)
                else:
                    d = random_defect(image, rng)
                    damaged, mask = d.image, d.mask
                    if rng.random() < 0.3:  # sometimes a second defect on the same section
                        d2 = random_defect(damaged, rng)
                        damaged, mask = d2.image, np.where(d2.mask > 0, d2.mask, mask)
                name = f"{st.name}_z{z:04d}_{copy}"
                tifffile.imwrite(out / "images" / f"{name}.tif", damaged.astype(np.float32))
                tifffile.imwrite(out / "masks" / f"{name}.tif", mask)
                counts += np.bincount(mask.ravel(), minlength=len(CLASSES))
                samples += 1
        meta = {
            "class_names": list(CLASSES),
            "mask_kind": "class",
            "description": f"synthetic defects on {st.source}",
        }
        (out / "images" / "dataset.yaml").write_text(yaml.safe_dump(meta))
    return {
        "images": str(final / "images"),
        "masks": str(final / "masks"),
        "samples": samples,
        "class_pixels": dict(zip(CLASSES, counts.tolist())),
    }


__all__ = [
    "CLASSES",
    "Defect",
    "GENERATORS",
    "crack",
    "defect_weights",
    "fold",
    "make_defect_dataset",
    "missing",
    "random_defect",
    "seam",
]

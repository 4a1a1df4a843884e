"""Synthetic empty fields: a training image with its labelled objects removed.

A training set of nuclei rarely holds a field without nuclei (bbbc039's 80 training images
hold none), yet the robust normalisation (:mod:`scarce.data.normalize`) treats an empty field
differently from every training image: its scale is held by the noise floor, so its noise and
debris reach a contrast the network never saw with the label "background". Removing the
objects from a training crop and normalising what is left as a field of its own shows the
network exactly that input, with its true label (no objects).

Objects are replaced by the local background plus real background noise: the background level
is a normalised convolution (Knutsson & Westin 1993) of the pixels away from any object, and
the noise is the residual of randomly chosen background pixels, so illumination gradients,
noise level, noise distribution and unlabelled debris stay as they were.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

#: Pixels within this distance of an object are replaced too (the object's blur skirt), pixels.
DEFAULT_MARGIN = 8
#: Gaussian sigma of the local background estimate, pixels.
DEFAULT_SIGMA = 8.0
#: A crop with a smaller fraction of background pixels is not emptied.
MIN_BACKGROUND_FRACTION = 0.2


def empty_field(
    image: np.ndarray,
    objects: np.ndarray,
    rng: np.random.Generator,
    *,
    margin: int = DEFAULT_MARGIN,
    sigma: float = DEFAULT_SIGMA,
    min_background: float = MIN_BACKGROUND_FRACTION,
) -> np.ndarray | None:
    """The image with every object (and a ``margin`` around it) replaced by background.

    Parameters
    ----------
    image : ndarray, shape (C, H, W)
        Any integer or floating dtype; not modified.
    objects : ndarray of bool, shape (H, W)
        True on labelled objects (e.g. ``mask != 0``).
    rng : numpy.random.Generator
        Chooses the background pixels whose noise fills the objects.
    margin : int
        Pixels within this Euclidean distance of an object are replaced as well, pixels.
    sigma : float
        Gaussian sigma of the local background level, pixels.
    min_background : float
        Return None when fewer than this fraction of the pixels are background.

    Returns
    -------
    ndarray, shape (C, H, W), the dtype of ``image``, or None
        Replaced pixels are ``level + residual``: ``level`` the Gaussian-weighted mean of the
        background pixels around them (the nearest defined level where no background pixel
        lies within about 3 sigma), ``residual`` the difference between one randomly chosen
        background pixel and its own level (the same pixel for every channel). Integer images
        are rounded and clipped to their dtype's range.

    Raises
    ------
    ValueError
        If ``image`` is not (C, H, W), ``objects`` is not (H, W), ``margin`` < 0 or
        ``sigma`` <= 0.

    References
    ----------
    Knutsson H., Westin C.-F. "Normalized and differential convolution." CVPR 1993,
    doi:10.1109/CVPR.1993.341081 (the background level from the background pixels only).
    """
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {image.shape}")
    if objects.shape != image.shape[1:]:
        raise ValueError(f"objects must be {image.shape[1:]} (H, W), got {objects.shape}")
    if margin < 0 or sigma <= 0:
        raise ValueError(f"margin must be >= 0 and sigma > 0, got {margin} and {sigma}")
    objects = objects.astype(bool, copy=False)
    if not objects.any():
        return image.copy()
    replace = ndi.distance_transform_edt(~objects) <= margin
    keep = ~replace
    if keep.mean() < min_background:
        return None
    weight = ndi.gaussian_filter(keep.astype(np.float32), sigma)
    defined = weight > 1e-3
    nearest = None
    if not defined.all():  # deep inside a big object: take the nearest defined level
        nearest = ndi.distance_transform_edt(~defined, return_distances=False, return_indices=True)
    donors = np.flatnonzero(keep)
    donors = donors[rng.integers(len(donors), size=int(replace.sum()))]
    out = image.copy()
    for c in range(image.shape[0]):
        x = image[c].astype(np.float32)
        level = ndi.gaussian_filter(np.where(keep, x, 0.0), sigma) / np.maximum(weight, 1e-12)
        if nearest is not None:
            level = level[tuple(nearest)]
        fill = level[replace] + (x.ravel()[donors] - level.ravel()[donors])
        if np.issubdtype(image.dtype, np.integer):
            info = np.iinfo(image.dtype)
            fill = np.clip(np.rint(fill), info.min, info.max)
        out[c][replace] = fill.astype(image.dtype)
    return out


def empty_crop(
    image: np.ndarray, mask: np.ndarray, centre: tuple[float, float], side: int, rng
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]] | None:
    """A synthetic empty field: a crop around ``centre`` with its labelled pixels removed.

    Parameters
    ----------
    image : ndarray, shape (C, H, W)
        Any integer or floating dtype; not modified.
    mask : ndarray of int, shape (H, W)
        Class or instance labels; every nonzero value (objects, foreground classes, an
        ignore label) is replaced by background.
    centre : tuple of float
        ``(y, x)`` the crop is centred on where the image allows, pixels.
    side : int
        Crop side (at most the image's), pixels.
    rng : numpy.random.Generator
        As :func:`empty_field`.

    Returns
    -------
    (crop, zero_mask, centre_in_crop) or None
        ``crop`` (C, h, w) from :func:`empty_field`, ``zero_mask`` (h, w) of ``mask``'s dtype,
        ``centre`` in crop coordinates; None when the crop is mostly objects (see
        :data:`MIN_BACKGROUND_FRACTION`).

    Raises
    ------
    ValueError
        As :func:`empty_field`.
    """
    box = []
    for c, n in zip(centre, mask.shape):
        lo = int(min(max(round(c) - side // 2, 0), max(n - side, 0)))
        box.append(slice(lo, min(lo + side, n)))
    crop = empty_field(image[:, box[0], box[1]], mask[box[0], box[1]] != 0, rng)
    if crop is None:
        return None
    zero = np.zeros(crop.shape[1:], mask.dtype)
    return crop, zero, (centre[0] - box[0].start, centre[1] - box[1].start)


__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_SIGMA",
    "MIN_BACKGROUND_FRACTION",
    "empty_crop",
    "empty_field",
]

"""Intensity normalisation shared by the readers and the predictor (no torch, no readers).

A normalisation is described by a *spec*, a plain-JSON dict saved in every checkpoint so that
prediction normalises exactly as training did::

    {"mode": "zscore" | "percentile" | "dataset",
     "percentiles": [lo, hi],           # used by "percentile"
     "mean": [...] or None,             # per channel, used by "dataset"
     "std": [...] or None}

:func:`normalization_params` turns a spec and an image into ``(offset, scale)`` per channel
with ``normalised = (image - offset) / scale``:

- ``zscore``: mean and standard deviation of this image (NIST semantic-segmentation-unet);
- ``percentile``: ``offset = p_lo``, ``scale = p_hi - p_lo`` of this image (CSBDeep/StarDist);
- ``dataset``: mean and std of the training set, from the database metadata.

Per-image statistics of images above :data:`MAX_STAT_PIXELS` pixels are estimated on a
regular strided subsample (deterministic). Scales are floored at
``1e-6 * max(1, max |x|)`` per channel, so a constant image gives zeros, never inf or NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from scarce.config import CHOICES

NORMALIZATION_MODES = CHOICES["data.normalization"]
MAX_STAT_PIXELS = 4_000_000  # above this many pixels per channel, statistics use a subsample
_RELATIVE_FLOOR = 1e-6


def normalization_spec(
    mode: str, percentiles: Sequence[float] = (1.0, 99.8), metadata: Mapping | None = None
) -> dict:
    """Build the plain-JSON normalisation spec stored in checkpoints.

    Parameters
    ----------
    mode : str
        One of :data:`NORMALIZATION_MODES`.
    percentiles : pair of float
        ``(lo, hi)`` percentiles in [0, 100], lo < hi, for ``"percentile"`` (kept in every
        spec so a checkpoint records the full setting).
    metadata : mapping, optional
        Database metadata; ``"dataset"`` needs ``metadata["intensity"] = {"mean": [...],
        "std": [...]}`` with one value per channel (written by ingest).

    Returns
    -------
    dict
        ``{"mode", "percentiles": [lo, hi], "mean": list or None, "std": list or None}``.

    Raises
    ------
    ValueError
        On an unknown mode, bad percentiles, or ``"dataset"`` without usable intensity
        statistics in ``metadata``.

    References
    ----------
    Weigert et al., "Content-aware image restoration" (CSBDeep), Nature Methods 2018,
    doi:10.1038/s41592-018-0216-7 (percentile normalisation); NIST
    semantic-segmentation-unet (per-image z-score).
    """
    if mode not in NORMALIZATION_MODES:
        raise ValueError(f"normalization mode {mode!r} is not one of {list(NORMALIZATION_MODES)}")
    lo, hi = (float(p) for p in percentiles)
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= lo < hi <= 100, got {list(percentiles)}")
    mean = std = None
    if mode == "dataset":
        stats = (metadata or {}).get("intensity")
        if not isinstance(stats, Mapping) or stats.get("mean") is None or stats.get("std") is None:
            raise ValueError(
                "normalization 'dataset' needs metadata['intensity'] with 'mean' "
                f"and 'std' per channel, got {stats!r}; re-ingest the data or "
                "use data.normalization: zscore"
            )
        mean = [float(v) for v in np.ravel(stats["mean"])]
        std = [float(v) for v in np.ravel(stats["std"])]
        if len(mean) != len(std) or not all(math.isfinite(v) for v in mean + std):
            raise ValueError(
                f"metadata['intensity'] needs finite mean and std of equal length, "
                f"got mean={mean}, std={std}"
            )
    return {"mode": mode, "percentiles": [lo, hi], "mean": mean, "std": std}


def stat_step(height: int, width: int) -> int:
    """Row and column stride of the statistics sample: 1 up to MAX_STAT_PIXELS pixels, else
    ``ceil(sqrt(H * W / MAX_STAT_PIXELS))`` (block-wise prediction takes the same sample)."""
    pixels = height * width
    return 1 if pixels <= MAX_STAT_PIXELS else math.ceil(math.sqrt(pixels / MAX_STAT_PIXELS))


def _subsample(image: np.ndarray) -> np.ndarray:
    """A regular strided view of at most about MAX_STAT_PIXELS pixels per channel."""
    step = stat_step(image.shape[1], image.shape[2])
    return image if step == 1 else image[:, ::step, ::step]


def _floor(values: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    return np.maximum(values, _RELATIVE_FLOOR * np.maximum(magnitude, 1.0))


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or 0 in image.shape:
        raise ValueError(
            f"image must be a non-empty (C, H, W) array, got "
            f"{getattr(image, 'shape', type(image))}; scarce.io.read_image "
            "returns this layout"
        )
    if image.dtype.kind not in "biuf":
        raise TypeError(f"image dtype {image.dtype} is not numeric")


def normalization_params(
    image: np.ndarray, spec: Mapping, *, sampled: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(offset, scale)`` such that ``normalised = (image - offset) / scale``.

    Parameters
    ----------
    image : ndarray, shape (C, H, W)
        Any numeric dtype (statistics are computed in float64). Images with more than
        :data:`MAX_STAT_PIXELS` pixels use every ``s``-th row and column,
        ``s = ceil(sqrt(H * W / MAX_STAT_PIXELS))``.
    spec : mapping
        From :func:`normalization_spec` (or a checkpoint).
    sampled : bool
        ``image`` already is the strided sample of a larger image
        (``full[:, ::s, ::s]``, ``s = stat_step(H, W)``): use all of it. Gives the same
        result as passing the full image.

    Returns
    -------
    offset, scale : ndarray of float32, shape (C,)
        ``scale >= 1e-6 * max(1, max |image|)`` per channel (constant images give zeros).

    Raises
    ------
    ValueError
        On a bad image shape, an unknown mode, a non-finite image statistic, or a dataset
        spec whose channel count differs from the image's.

    References
    ----------
    Weigert et al., Nature Methods 2018, doi:10.1038/s41592-018-0216-7 (percentiles).
    """
    _check_image(image)
    mode = spec.get("mode")
    channels = image.shape[0]
    sample = (image if sampled else _subsample(image)).reshape(channels, -1)
    magnitude = np.maximum(
        np.abs(sample.min(axis=1).astype(np.float64)), np.abs(sample.max(axis=1).astype(np.float64))
    )
    if mode == "zscore":
        offset = sample.mean(axis=1, dtype=np.float64)
        scale = sample.std(axis=1, dtype=np.float64)
    elif mode == "percentile":
        lo, hi = np.percentile(sample, spec["percentiles"], axis=1)
        offset, scale = lo, hi - lo
    elif mode == "dataset":
        offset = np.asarray(spec["mean"], dtype=np.float64)
        scale = np.asarray(spec["std"], dtype=np.float64)
        if offset.shape != (channels,) or scale.shape != (channels,):
            raise ValueError(
                f"dataset normalisation has {offset.size} channel(s) but the "
                f"image has {channels}; ingest and predict the same channels"
            )
    else:
        raise ValueError(f"normalization mode {mode!r} is not one of {list(NORMALIZATION_MODES)}")
    if not (np.all(np.isfinite(offset)) and np.all(np.isfinite(scale))):
        raise ValueError(
            f"normalisation statistics are not finite (offset {offset}, scale "
            f"{scale}); the image holds inf or NaN values"
        )
    return offset.astype(np.float32), _floor(scale, magnitude).astype(np.float32)


def normalize(image: np.ndarray, spec: Mapping) -> np.ndarray:
    """Normalise a whole image: ``(image - offset) / scale`` per channel.

    Parameters
    ----------
    image : ndarray, shape (C, H, W)
        Any numeric dtype; not modified.
    spec : mapping
        From :func:`normalization_spec`.

    Returns
    -------
    ndarray of float32, shape (C, H, W)

    Raises
    ------
    ValueError
        As :func:`normalization_params`.
    """
    offset, scale = normalization_params(image, spec)
    out = image.astype(np.float32)
    out -= offset[:, None, None]
    out /= scale[:, None, None]
    return out


__all__ = [
    "MAX_STAT_PIXELS",
    "NORMALIZATION_MODES",
    "normalization_params",
    "normalization_spec",
    "normalize",
    "stat_step",
]

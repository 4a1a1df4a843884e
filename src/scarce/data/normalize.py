"""Intensity normalisation shared by the readers and the predictor (no torch, no readers).

A normalisation is described by a *spec*, a plain-JSON dict saved in every checkpoint so that
prediction normalises exactly as training did::

    {"mode": "zscore" | "percentile" | "robust" | "dataset",
     "percentiles": [lo, hi],           # used by "percentile" and "robust"
     "noise_floor": [k, ...] or None,   # per channel, used by "robust"
     "floor_fraction": f, "training_snr": [...] or None,   # how "robust" chose k
     "floor_location": "blend" | "low" | None,  # "robust": the location of floored images
     "mean": [...] or None,             # per channel, used by "dataset"
     "std": [...] or None}

:func:`normalization_params` turns a spec and an image into ``(offset, scale)`` per channel
with ``normalised = (image - offset) / scale``:

- ``zscore``: mean and standard deviation of this image (NIST semantic-segmentation-unet);
- ``percentile``: ``offset = p_lo``, ``scale = p_hi - p_lo`` of this image (CSBDeep/StarDist);
- ``robust``: as ``percentile``, but ``scale = max(p_hi - p_lo, k * sigma)`` with ``sigma``
  the image's noise (:func:`noise_sigma`) and ``k = noise_floor``: an image whose range is
  less than ``k`` noise standard deviations (an empty or near-empty field) is not stretched,
  so its noise stays near 0 instead of filling [0, 1]. Where the floor holds the scale, the
  location moves from ``p_lo`` towards the median in proportion
  (``offset = p_lo + (1 - (p_hi - p_lo) / scale) * (median - p_lo)``, ``floor_location:
  blend``; ``low`` keeps ``p_lo``, as specs written before it): an empty field's background
  lands near 0 like a nucleus field's, where with ``p_lo`` uneven illumination put it at
  0.1-0.12 and a bbbc039 model painted ~53 false nuclei per empty field (0.5 blended;
  ``benchmarks/results/generalise.md``). ``k`` is fixed at training time as
  ``floor_fraction`` (default 0.25) times the training images' median signal-to-noise ratio
  (:func:`signal_to_noise`), because what counts as "only noise" depends on the modality:
  the median ratio is 194 on bbbc039 (fluorescence; its empty fields 8-10), 50 on nist_rpe
  (phase contrast) and 43 on isbi2012 (EM, where fine texture counts as noise). Invariant to
  gain and offset (percentiles and sigma scale with the gain, the offset cancels) and, up to
  quantisation, to bit depth;
- ``dataset``: mean and std of the training set, from the database metadata (not invariant:
  an image from another camera, gain or bit depth lands outside the training range).

Export to bioimage.io: ``zscore`` is ``zero_mean_unit_variance`` (mode per_sample),
``percentile`` is ``scale_range`` (per_sample, ``min_percentile=lo``, ``max_percentile=hi``),
``dataset`` is ``zero_mean_unit_variance`` with fixed ``mean``/``std``. ``robust`` is
``scale_range`` whenever the floor is inactive (``p_hi - p_lo >= k * sigma``, every non-empty
image of bbbc039 and dsb2018); the floor itself has no bioimage.io operator, so an exported
model either ships a custom preprocessing step (:func:`noise_sigma` is numpy-only and short)
or passes the per-image ``(offset, scale)`` of :func:`normalization_params` as
``scale_linear`` (``gain = 1 / scale``, ``offset = -offset / scale``), computed per image.

Per-image statistics of images above :data:`MAX_STAT_PIXELS` pixels are estimated on a
regular strided subsample (deterministic). Scales are floored at
``1e-6 * max(1, max |x|)`` per channel, so a constant image gives zeros, never inf or NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

from scarce.config import CHOICES

NORMALIZATION_MODES = CHOICES["data.normalization"]
MAX_STAT_PIXELS = 4_000_000  # above this many pixels per channel, statistics use a subsample
_RELATIVE_FLOOR = 1e-6
DEFAULT_FLOOR_FRACTION = 0.25  # "robust": k = this x the training images' median SNR
# Immerkaer's noise kernel: the difference of two Laplacians; it cancels constant, linear and
# most of smooth image structure, leaving the noise (norm sqrt(36) = 6 per unit of sigma)
_NOISE_KERNEL = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
_MAD_TO_SIGMA = 1.482602218505602  # 1 / Phi^-1(3/4): MAD of a Gaussian -> its std
_BAND_ROWS = 32  # noise of big images: horizontal bands of this many rows


def normalization_spec(
    mode: str,
    percentiles: Sequence[float] = (1.0, 99.8),
    metadata: Mapping | None = None,
    *,
    images: Iterable[np.ndarray] | None = None,
    floor_fraction: float = DEFAULT_FLOOR_FRACTION,
) -> dict:
    """Build the plain-JSON normalisation spec stored in checkpoints.

    Parameters
    ----------
    mode : str
        One of :data:`NORMALIZATION_MODES`.
    percentiles : pair of float
        ``(lo, hi)`` percentiles in [0, 100], lo < hi, for ``"percentile"`` and ``"robust"``
        (kept in every spec so a checkpoint records the full setting).
    metadata : mapping, optional
        Database metadata; ``"dataset"`` needs ``metadata["intensity"] = {"mean": [...],
        "std": [...]}`` with one value per channel (written by ingest).
    images : iterable of ndarray (C, H, W), optional
        Raw training images (a sample is enough); ``"robust"`` needs them to fix its noise
        floor ``k = floor_fraction * median(signal_to_noise(image))`` per channel.
    floor_fraction : float
        See ``images`` (dimensionless, >= 0; 0 makes ``"robust"`` plain ``"percentile"``).

    Returns
    -------
    dict
        ``{"mode", "percentiles": [lo, hi], "noise_floor": [k per channel] or None,
        "floor_fraction": f, "floor_location": "blend" (robust) or None,
        "training_snr": [median SNR per channel] or None, "mean": list or None,
        "std": list or None}``.

    Raises
    ------
    ValueError
        On an unknown mode, bad percentiles, a negative or non-finite ``floor_fraction``,
        ``"robust"`` without ``images`` (or with images of different channel counts), or
        ``"dataset"`` without usable intensity statistics in ``metadata``.

    References
    ----------
    Weigert et al., "Content-aware image restoration" (CSBDeep), Nature Methods 2018,
    doi:10.1038/s41592-018-0216-7 (percentile normalisation); NIST
    semantic-segmentation-unet (per-image z-score); Immerkaer, "Fast noise variance
    estimation", CVIU 64(2):300-302, 1996, doi:10.1006/cviu.1996.0060 (the noise floor).
    """
    if mode not in NORMALIZATION_MODES:
        raise ValueError(f"normalization mode {mode!r} is not one of {list(NORMALIZATION_MODES)}")
    lo, hi = (float(p) for p in percentiles)
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= lo < hi <= 100, got {list(percentiles)}")
    if not (math.isfinite(float(floor_fraction)) and float(floor_fraction) >= 0.0):
        raise ValueError(f"floor_fraction must be a finite number >= 0, got {floor_fraction!r}")
    mean = std = floor = snr = None
    if mode == "robust":
        snr = _median_snr(images, (lo, hi))
        floor = [float(floor_fraction) * v for v in snr]
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
    return {
        "mode": mode,
        "percentiles": [lo, hi],
        "noise_floor": floor,
        "floor_fraction": float(floor_fraction),
        "floor_location": "blend" if mode == "robust" else None,
        "training_snr": snr,
        "mean": mean,
        "std": std,
    }


def _median_snr(images, percentiles) -> list[float]:
    """Per-channel median of :func:`signal_to_noise` over ``images``."""
    ratios = [signal_to_noise(image, percentiles) for image in (images or ())]
    if not ratios or len({r.shape for r in ratios}) != 1:
        raise ValueError(
            "normalization 'robust' needs raw training images of one channel count to fix "
            "its noise floor (normalization_spec(..., images=...)); got "
            f"{len(ratios)} image(s) with channel counts {sorted({r.size for r in ratios})}"
        )
    return [float(v) for v in np.median(np.stack(ratios), axis=0)]


def signal_to_noise(image: np.ndarray, percentiles: Sequence[float] = (1.0, 99.8)) -> np.ndarray:
    """``(p_hi - p_lo) / noise_sigma`` per channel: an image's range in noise units.

    Parameters
    ----------
    image : ndarray, shape (C, H, W)
        Raw image, any numeric dtype.
    percentiles : pair of float
        ``(lo, hi)`` in [0, 100].

    Returns
    -------
    ndarray of float64, shape (C,)
        Dimensionless; 0 where the noise is 0 (a constant float image). Invariant to gain and
        offset. A field with only noise gives about 5-10; bbbc039's nuclei fields 131-255.

    Raises
    ------
    ValueError, TypeError
        As :func:`normalization_params` for a bad image.
    """
    _check_image(image)
    sample = _subsample(image).reshape(image.shape[0], -1)
    lo, hi = np.percentile(sample, list(percentiles), axis=1)
    sigma = noise_sigma(image)
    return np.where(sigma > 0, (hi - lo) / np.where(sigma > 0, sigma, 1.0), 0.0)


def stat_step(height: int, width: int) -> int:
    """Row and column stride of the statistics sample: 1 up to MAX_STAT_PIXELS pixels, else
    ``ceil(sqrt(H * W / MAX_STAT_PIXELS))`` (block-wise prediction takes the same sample)."""
    pixels = height * width
    return 1 if pixels <= MAX_STAT_PIXELS else math.ceil(math.sqrt(pixels / MAX_STAT_PIXELS))


def _subsample(image: np.ndarray) -> np.ndarray:
    """A regular strided view of at most about MAX_STAT_PIXELS pixels per channel."""
    step = stat_step(image.shape[1], image.shape[2])
    return image if step == 1 else image[:, ::step, ::step]


def _bands(image: np.ndarray) -> list[np.ndarray]:
    """The whole image, or evenly spaced full-width row bands of about MAX_STAT_PIXELS."""
    height, width = image.shape[1:]
    if height * width <= MAX_STAT_PIXELS or height <= _BAND_ROWS:
        return [image]
    count = max(1, min(height // _BAND_ROWS, MAX_STAT_PIXELS // (_BAND_ROWS * width)))
    starts = np.linspace(0, height - _BAND_ROWS, count).round().astype(int)
    return [image[:, s : s + _BAND_ROWS] for s in np.unique(starts)]


def noise_sigma(image: np.ndarray) -> np.ndarray:
    """Robust per-channel estimate of the standard deviation of the image's pixel noise.

    The image is filtered with Immerkaer's 3 x 3 kernel ``[[1, -2, 1], [-2, 4, -2], [1, -2,
    1]]`` (a difference of two Laplacians: it removes constant, linear and most smooth
    structure and keeps the noise, times 6 for white noise); the estimate is the median
    absolute deviation of the filtered interior pixels, times 1.4826 / 6. The median (instead
    of Immerkaer's mean absolute value) ignores the few pixels on object edges. For integer
    images it is at least ``1 / sqrt(12)`` grey levels, the noise of rounding to integers,
    so a flat quantised background never gives 0.

    Parameters
    ----------
    image : ndarray or dask array, shape (C, H, W)
        Any numeric dtype; H, W >= 3 for a measurement (smaller images give 0 or the
        quantisation floor). A Dask array is read only in the bands used. Images with more than :data:`MAX_STAT_PIXELS` pixels use evenly
        spaced full-width bands of 32 rows (deterministic).

    Returns
    -------
    ndarray of float64, shape (C,)
        Noise standard deviation per channel, in the image's grey levels. Scales with a gain
        and ignores an offset: ``noise_sigma(a * x + b) == |a| * noise_sigma(x)`` for float
        images.

    References
    ----------
    Immerkaer J., "Fast noise variance estimation", Computer Vision and Image Understanding
    64(2):300-302, 1996, doi:10.1006/cviu.1996.0060; Donoho D. L. & Johnstone I. M.,
    Biometrika 81(3):425-455, 1994, doi:10.1093/biomet/81.3.425 (the MAD of a high-pass
    residual as a noise estimate).
    """
    channels = image.shape[0]
    residuals = [[] for _ in range(channels)]
    for band in _bands(image):
        for c in range(channels):
            if min(band.shape[1:]) >= 3:
                r = ndi.convolve(band[c].astype(np.float64), _NOISE_KERNEL, mode="nearest")
                residuals[c].append(r[1:-1, 1:-1].ravel())
    sigma = np.zeros(channels)
    for c, parts in enumerate(residuals):
        if parts:
            r = np.concatenate(parts)
            sigma[c] = _MAD_TO_SIGMA * np.median(np.abs(r - np.median(r))) / 6.0
    if image.dtype.kind in "biu":
        sigma = np.maximum(sigma, 1.0 / math.sqrt(12.0))
    return sigma


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
    image: np.ndarray, spec: Mapping, *, sampled: bool = False, noise: np.ndarray | None = None
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
        result as passing the full image (with ``noise`` for ``robust``).
    noise : ndarray of float, shape (C,), optional
        :func:`noise_sigma` of the full image, for ``robust`` with a ``sampled`` image (the
        noise of a strided sample is not the image's); computed from ``image`` if omitted.

    Returns
    -------
    offset, scale : ndarray of float32, shape (C,)
        ``scale >= 1e-6 * max(1, max |image|)`` per channel (constant images give zeros);
        ``robust``: also ``scale >= noise_floor * noise_sigma(image)``.

    Raises
    ------
    ValueError
        On a bad image shape, an unknown mode, a non-finite image statistic, or a dataset
        spec whose channel count differs from the image's.

    References
    ----------
    Weigert et al., Nature Methods 2018, doi:10.1038/s41592-018-0216-7 (percentiles);
    :func:`noise_sigma` for the ``robust`` floor.
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
    elif mode == "robust":
        p_lo, p_hi = spec["percentiles"]
        lo, median, hi = np.percentile(sample, [p_lo, 50.0, p_hi], axis=1)
        offset, scale = lo, hi - lo
        k = np.asarray(spec["noise_floor"], dtype=np.float64)
        if k.shape != (channels,):
            raise ValueError(
                f"robust normalisation has a noise floor for {k.size} channel(s) but the "
                f"image has {channels}; ingest and predict the same channels"
            )
        sigma = noise_sigma(image) if noise is None else np.asarray(noise, np.float64)
        scale = np.maximum(scale, k * sigma)
        if spec.get("floor_location", "low") == "blend":
            # where the floor holds the scale (a dim or empty field), the location moves
            # from p_lo towards the median in proportion: an empty field's background
            # lands near 0, where the training images' backgrounds lie, instead of
            # (median - p_lo) / scale above it (uneven illumination, debris)
            held = 1.0 - (hi - lo) / np.maximum(scale, 1e-300)
            offset = lo + held * (median - lo)
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
    "DEFAULT_FLOOR_FRACTION",
    "MAX_STAT_PIXELS",
    "NORMALIZATION_MODES",
    "normalization_params",
    "normalization_spec",
    "noise_sigma",
    "normalize",
    "signal_to_noise",
    "stat_step",
]

"""Input drift: is a new image's normalised intensity like the training images'?

A model fails silently on images unlike its training data (another camera, bit depth, stain,
an empty field). Training records a few statistics of every normalised training image
(:func:`training_statistics`, saved in the checkpoint extras as ``input_statistics``);
prediction computes the same statistics of each new image after normalisation and names
those that fall far outside the training range (:func:`unusual_statistics`), so a silent
failure becomes a visible warning.

Statistics per channel, of the *normalised* image (:data:`STATISTICS`):

- ``p1``, ``median``, ``p99.8``: the 1st, 50th and 99.8th percentiles (where background and
  objects sit; with ``robust`` normalisation p1 = 0 and p99.8 = 1 unless the noise floor
  held the scale, i.e. a dim or empty field; with ``dataset`` normalisation they move with
  gain, offset and bit depth);
- ``noise``: :func:`scarce.data.normalize.noise_sigma` of the normalised image (the inverse
  of the signal-to-noise ratio for the percentile modes).

A value is *far outside* when it lies more than ``margin`` below the training minimum or
above the training maximum, ``margin = max(p95 - p5, 0.25 * max(|p5|, |p95|), 1e-3)`` of the
training values (a spread that does not vanish for a constant statistic such as ``p1``
under ``robust``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np

from scarce.data.normalize import MAX_STAT_PIXELS, noise_sigma

logger = logging.getLogger(__name__)

STATISTICS = ("p1", "median", "p99.8", "noise")
_PERCENTILES = (1.0, 50.0, 99.8)
_RELATIVE_MARGIN = 0.25
_ABSOLUTE_MARGIN = 1e-3


def image_statistics(image: np.ndarray) -> dict[str, list[float]]:
    """The :data:`STATISTICS` of one normalised image, per channel.

    Parameters
    ----------
    image : ndarray of float, shape (C, H, W)
        A normalised image (:func:`scarce.data.normalize.normalize`). Percentiles of images
        above :data:`~scarce.data.normalize.MAX_STAT_PIXELS` pixels use a strided subsample.

    Returns
    -------
    dict
        ``{name: [value per channel]}`` for each name in :data:`STATISTICS` (plain floats,
        dimensionless: normalised intensity units).

    Raises
    ------
    ValueError
        If ``image`` is not a non-empty 3-D array.
    """
    image = np.asarray(image)
    if image.ndim != 3 or 0 in image.shape:
        raise ValueError(f"image must be a non-empty (C, H, W) array, got shape {image.shape}")
    step = max(1, int(np.ceil(np.sqrt(image.shape[1] * image.shape[2] / MAX_STAT_PIXELS))))
    sample = image[:, ::step, ::step].reshape(image.shape[0], -1)
    p1, median, p998 = np.percentile(sample, _PERCENTILES, axis=1)
    noise = noise_sigma(image.astype(np.float32, copy=False))
    values = dict(zip(STATISTICS, (p1, median, p998, noise)))
    return {k: [float(x) for x in v] for k, v in values.items()}


def training_statistics(images: Iterable[np.ndarray]) -> dict:
    """Summarise the statistics of normalised training images (stored in checkpoints).

    Parameters
    ----------
    images : iterable of ndarray, shape (C, H, W)
        Normalised training images (all with the same C).

    Returns
    -------
    dict
        ``{"images": n, "statistics": {name: {"min", "p5", "median", "p95", "max": [per
        channel]}}}``, plain JSON.

    Raises
    ------
    ValueError
        If ``images`` is empty or the channel counts differ.
    """
    rows = [image_statistics(im) for im in images]
    if not rows:
        raise ValueError("no training images to summarise")
    if len({len(r["median"]) for r in rows}) != 1:
        raise ValueError("training images have different channel counts")
    summary = {}
    for name in STATISTICS:
        values = np.array([r[name] for r in rows])  # (n, C)
        q = np.percentile(values, [0, 5, 50, 95, 100], axis=0)
        summary[name] = {
            key: [float(x) for x in row]
            for key, row in zip(("min", "p5", "median", "p95", "max"), q)
        }
    return {"images": len(rows), "statistics": summary}


def unusual_statistics(image: np.ndarray, training: Mapping, *, margin: float = 1.0) -> list[str]:
    """Describe every statistic of a normalised image that lies far outside the training's.

    Parameters
    ----------
    image : ndarray of float, shape (C, H, W)
        The normalised image.
    training : mapping
        From :func:`training_statistics` (a checkpoint's ``extras["input_statistics"]``).
    margin : float
        Multiplier of the allowed distance beyond the training range (see the module
        docstring); larger is more tolerant.

    Returns
    -------
    list of str
        One entry per (statistic, channel) outside the range, e.g. ``"median 3.1 (channel 0;
        training 0.01..0.05)"``; empty when the image looks like the training data.
    """
    got = image_statistics(image)
    problems = []
    for name in STATISTICS:
        ref = training["statistics"].get(name)
        if ref is None:
            continue
        for c, value in enumerate(got[name]):
            if c >= len(ref["min"]):
                continue
            lo, hi = ref["min"][c], ref["max"][c]
            spread = max(
                ref["p95"][c] - ref["p5"][c],
                _RELATIVE_MARGIN * max(abs(ref["p5"][c]), abs(ref["p95"][c])),
                _ABSOLUTE_MARGIN,
            )
            if not lo - margin * spread <= value <= hi + margin * spread:
                problems.append(
                    f"{name} {value:.4g} (channel {c}; training {lo:.4g}..{hi:.4g} over "
                    f"{training['images']} images)"
                )
    return problems


def warn_if_unusual(
    image: np.ndarray, training: Mapping | None, name: str = "image", *, margin: float = 1.0
) -> list[str]:
    """Log one warning naming ``name`` and its unusual statistics; return them.

    Parameters
    ----------
    image : ndarray of float, shape (C, H, W)
        The normalised image.
    training : mapping or None
        A checkpoint's ``extras["input_statistics"]``; None (checkpoints from before this
        check) skips it.
    name : str
        What to call the image (its path).
    margin : float
        See :func:`unusual_statistics`.

    Returns
    -------
    list of str
        :func:`unusual_statistics`; at most one ``logging`` warning is emitted per call.
    """
    if not training:
        return []
    problems = unusual_statistics(image, training, margin=margin)
    if problems:
        logger.warning(
            "%s: normalised intensity far outside the training images': %s. The prediction "
            "may be wrong (another microscope, bit depth, stain, or an empty field); check it, "
            "or fine-tune on such images (scarce train --init-from)",
            name,
            "; ".join(problems),
        )
    return problems


__all__ = [
    "STATISTICS",
    "image_statistics",
    "training_statistics",
    "unusual_statistics",
    "warn_if_unusual",
]

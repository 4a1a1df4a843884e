"""Photometric augmentation: gamma, intensity, blur, noise and cutouts on an image patch.

These transforms act on the image patch only, after the geometric warp of
:mod:`scarce.data.augment` (masks are never touched), in a fixed order: gamma, intensity, blur,
noise, cutouts. Each works per channel on the patch's *current* dynamic range (its min and
max at that step), so it behaves the same for any normalisation. Their parameters are drawn
by :func:`draw_photometric` (called by :func:`scarce.data.augment.draw_params`, after the
geometric draws) and stored in :class:`scarce.data.augment.AugmentParams`, which
:func:`apply_photometric` reads (this module does not import it: augment builds on it).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import numpy as np

from scarce.config import AugmentConfig

_BORDER = cv2.BORDER_REFLECT_101
_EPS = 1e-12  # floor of a channel's dynamic range (flat patches)
CUTOUT_KINDS = ("missing", "contrast", "noise")


class Cutout(NamedTuple):
    """One SEAMLeSS cutout, in output-patch pixels.

    ``kind`` is ``"missing"`` (fill at ``value`` x range above the patch minimum; ``value`` is
    0, i.e. black), ``"contrast"`` (multiply the range-normalised region by ``value`` in
    [1/2, 2]) or ``"noise"`` (replace the region by Gaussian noise with the patch channel's
    mean and ``value`` x its std; ``value`` is 1). The region is rows ``y0:y0 + h`` and
    columns ``x0:x0 + w``, pixels.
    """

    kind: str
    y0: int
    x0: int
    h: int
    w: int
    value: float


def draw_photometric(cfg: AugmentConfig, patch_size: int, rng: np.random.Generator) -> dict:
    """Draw one sample's photometric parameters, in the order intensity, gamma, blur, noise.

    Each transform is drawn only if its switch is on and a Bernoulli draw with its
    probability succeeds (a switched-off transform uses no random number); then one draw per
    switched-on cutout kind (see :class:`Cutout`). ``cfg`` is taken as valid:
    :func:`scarce.data.augment.draw_params` checks it first.

    Parameters
    ----------
    cfg : AugmentConfig
        The ``augment`` section of the training config.
    patch_size : int
        Side P of the output patch, pixels (cutout sides are at most
        ``cutout_max_fraction * P``).
    rng : numpy.random.Generator
        Source of randomness; the same state gives the same parameters.

    Returns
    -------
    dict
        ``noise_sigma``, ``blur_sigma``, ``intensity``, ``gamma`` (None when not drawn) and
        ``cutouts`` (tuple of :class:`Cutout`): keyword arguments of ``AugmentParams``.
    """

    def on(switch: bool, p: float) -> bool:
        return bool(rng.random() < p) if switch else False

    intensity = gamma = blur = noise = None
    if on(cfg.intensity, cfg.intensity_p):
        f = cfg.intensity_fraction
        intensity = (float(rng.uniform(-f, f)), float(1.0 + rng.uniform(-f, f)))
    if on(cfg.gamma, cfg.gamma_p):
        gamma = float(rng.uniform(*cfg.gamma_range))
    if on(cfg.blur, cfg.blur_p):
        blur = float(rng.uniform(0.0, cfg.blur_max_sigma))
    if on(cfg.noise, cfg.noise_p):
        noise = float(cfg.noise_fraction)
    return dict(
        noise_sigma=noise,
        blur_sigma=blur,
        intensity=intensity,
        gamma=gamma,
        cutouts=_draw_cutouts(cfg, patch_size, rng),
    )


def _draw_cutouts(cfg: AugmentConfig, size: int, rng: np.random.Generator) -> tuple:
    """At most one cutout per switched-on kind, each with probability ``cfg.cutout_p``."""
    cutouts = []
    side = max(1, round(cfg.cutout_max_fraction * size))
    switches = (cfg.cutout_missing, cfg.cutout_contrast, cfg.cutout_noise)
    for kind, switch in zip(CUTOUT_KINDS, switches):
        if not (switch and rng.random() < cfg.cutout_p):
            continue
        h, w = (int(v) for v in rng.integers(1, side + 1, 2))
        y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        value = {"missing": 0.0, "noise": 1.0}.get(kind)
        if value is None:  # contrast: multiply or divide by U(1, 2)
            factor = float(rng.uniform(1.0, 2.0))
            value = factor if rng.random() < 0.5 else 1.0 / factor
        cutouts.append(Cutout(kind, y0, x0, h, w, value))
    return tuple(cutouts)


def apply_photometric(patch: np.ndarray, params, rng: np.random.Generator) -> np.ndarray:
    """Apply gamma, intensity, blur, noise and cutouts (in this order) to an image patch.

    Each step works per channel on the patch's *current* dynamic range ``[lo, lo + span]``
    (min and max at that step), so it behaves the same for any normalisation. Gamma and
    intensity act on ``u = (x - lo) / span``: ``u ** gamma``, then ``u * gain + offset``.
    Blur is a Gaussian of radius ``ceil(3 sigma)`` with reflected borders; noise has std
    ``noise_sigma * span``. Cutouts: see :class:`Cutout`.

    Parameters
    ----------
    patch : ndarray of float32, shape (C, P, P)
        Modified in place.
    params : AugmentParams
        Only the photometric fields are read (None or ``()``: that step is skipped).
    rng : numpy.random.Generator
        Draws the noise fields (Gaussian noise and noise cutouts).

    Returns
    -------
    ndarray of float32, shape (C, P, P)
        ``patch`` itself.

    Raises
    ------
    ValueError
        For a cutout of unknown kind (not in ``CUTOUT_KINDS``), before the patch is touched.

    References
    ----------
    Mitchell et al., "Siamese Encoding and Alignment by Multiscale Learning with
    Self-Supervision" (SEAMLeSS), arXiv:1904.02643, 2019 (cutouts); DeVries & Taylor,
    "Improved Regularization of CNNs with Cutout", arXiv:1708.04552, 2017.
    """
    unknown = [cut.kind for cut in params.cutouts if cut.kind not in CUTOUT_KINDS]
    if unknown:
        raise ValueError(f"unknown cutout kind(s) {unknown}; expected one of {CUTOUT_KINDS}")
    if params.gamma is not None or params.intensity is not None:
        _gamma_intensity_(patch, params.gamma, params.intensity)
    if params.blur_sigma is not None and params.blur_sigma > 0:
        _blur_(patch, params.blur_sigma)
    if params.noise_sigma is not None:
        span = _range(patch)[1]
        patch += rng.standard_normal(patch.shape, dtype=np.float32) * (params.noise_sigma * span)
    for cut in params.cutouts:
        _apply_cutout(patch, cut, rng)
    return patch


def _range(patch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel minimum and dynamic range (max - min, floored), shape (C, 1, 1) each."""
    lo = patch.min(axis=(1, 2), keepdims=True)
    return lo, np.maximum(patch.max(axis=(1, 2), keepdims=True) - lo, _EPS)


def _gamma_intensity_(
    patch: np.ndarray, gamma: float | None, intensity: tuple[float, float] | None
) -> None:
    """In place: ``u ** gamma``, then ``u * gain + offset`` on the range-normalised patch."""
    lo, span = _range(patch)
    patch -= lo
    patch /= span
    if gamma is not None:
        np.power(np.maximum(patch, 0.0, out=patch), gamma, out=patch)
    if intensity is not None:
        patch *= intensity[1]
        patch += intensity[0]
    patch *= span
    patch += lo


def _blur_(patch: np.ndarray, sigma: float) -> None:
    """In place: Gaussian blur of each channel (never across channels), reflected borders."""
    k = 2 * math.ceil(3 * sigma) + 1
    for c in range(patch.shape[0]):
        patch[c] = cv2.GaussianBlur(patch[c], (k, k), sigma, borderType=_BORDER)


def _apply_cutout(patch: np.ndarray, cut: Cutout, rng: np.random.Generator) -> None:
    """In place: one :class:`Cutout` on every channel of ``patch`` ``(C, P, P)``."""
    lo, span = _range(patch)
    region = patch[:, cut.y0 : cut.y0 + cut.h, cut.x0 : cut.x0 + cut.w]
    if cut.kind == "missing":
        region[...] = lo + cut.value * span
    elif cut.kind == "contrast":
        region[...] = lo + (region - lo) * cut.value
    else:  # noise
        mean = patch.mean(axis=(1, 2), keepdims=True)
        std = patch.std(axis=(1, 2), keepdims=True)
        noise = rng.standard_normal(region.shape, dtype=np.float32)
        region[...] = mean + cut.value * std * noise


__all__ = ["CUTOUT_KINDS", "Cutout", "apply_photometric", "draw_photometric"]

"""Tests of scarce.data.photometric: dynamic-range transforms, cutouts, and the draw order."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from scarce.config import AugmentConfig
from scarce.data.augment import AugmentParams, draw_params
from scarce.data.photometric import Cutout, apply_photometric, draw_photometric

ALL_ON = AugmentConfig(
    elastic=True,
    intensity=True,
    gamma=True,
    gamma_p=0.6,
    noise_p=0.5,
    cutout_missing=True,
    cutout_contrast=True,
    cutout_noise=True,
    cutout_p=0.5,
)
PHOTOMETRIC_OFF = dict(
    noise=False,
    blur=False,
    intensity=False,
    gamma=False,
    cutout_missing=False,
    cutout_contrast=False,
    cutout_noise=False,
)


def test_noise_gamma_intensity_and_cutouts_follow_the_dynamic_range():
    rng = np.random.default_rng(11)
    ramp = np.tile(np.linspace(100.0, 300.0, 256, dtype=np.float32), (1, 256, 1))
    noisy = apply_photometric(ramp.copy(), AugmentParams(noise_sigma=0.02), rng)
    assert np.std(noisy - ramp) == pytest.approx(0.02 * 200, rel=0.05)
    gamma = apply_photometric(ramp.copy(), AugmentParams(gamma=2.0), rng)
    np.testing.assert_allclose(gamma, 100 + 200 * ((ramp - 100) / 200) ** 2, rtol=1e-5)
    bright = apply_photometric(ramp.copy(), AugmentParams(intensity=(0.05, 1.1)), rng)
    np.testing.assert_allclose(bright, 100 + 200 * (1.1 * (ramp - 100) / 200 + 0.05), rtol=1e-5)
    cuts = (
        Cutout("missing", 0, 0, 10, 10, 0.0),
        Cutout("contrast", 50, 50, 10, 10, 0.5),
        Cutout("noise", 100, 100, 30, 30, 1.0),
    )
    out = apply_photometric(ramp.copy(), AugmentParams(cutouts=cuts), rng)
    assert np.all(out[0, :10, :10] == 100.0)
    np.testing.assert_allclose(out[0, 50:60, 50:60], 100 + 0.5 * (ramp[0, 50:60, 50:60] - 100))
    assert np.std(out[0, 100:130, 100:130]) == pytest.approx(np.std(ramp), rel=0.2)
    np.testing.assert_array_equal(out[0, 200:, 200:], ramp[0, 200:, 200:])


def test_photometric_draws_follow_all_geometric_draws():
    """Same seed: the geometry does not depend on the photometric switches, and the
    photometric parameters are what draw_photometric gives after the geometric draws."""
    geometric_only = replace(ALL_ON, **PHOTOMETRIC_OFF)
    drawn = 0
    for seed in range(200):
        full = draw_params(ALL_ON, 128, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        geometry = draw_params(geometric_only, 128, rng)
        photometric = draw_photometric(ALL_ON, 128, rng)
        for name in ("flip_x", "flip_y", "angle", "shift", "scale"):
            assert getattr(full, name) == getattr(geometry, name)
        np.testing.assert_array_equal(full.elastic, geometry.elastic)
        assert geometry.noise_sigma is geometry.gamma is geometry.intensity is None
        assert geometry.cutouts == ()
        for name, value in photometric.items():
            assert getattr(full, name) == value, (seed, name)
        drawn += len(full.cutouts) + (full.gamma is not None) + (full.intensity is not None)
    assert drawn > 300  # the photometric parameters were really drawn, not all None


def test_unknown_cutout_kind_is_refused_before_the_patch_changes():
    rng = np.random.default_rng(0)
    patch = rng.random((2, 32, 32), dtype=np.float32)
    before = patch.copy()
    params = AugmentParams(gamma=2.0, cutouts=(Cutout("holes", 0, 0, 4, 4, 0.0),))
    with pytest.raises(ValueError, match=r"unknown cutout kind.*'holes'.*missing"):
        apply_photometric(patch, params, rng)
    np.testing.assert_array_equal(patch, before)

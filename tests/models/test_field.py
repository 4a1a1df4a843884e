"""Displacement fields: the conventions of DESIGN.md hold exactly where they must."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scarce.align.evaluate import random_deformation
from scarce.align.losses import PENALTIES, rigidity_penalty
from scarce.io import read_image
from scarce.models.field import (
    compose,
    downsample,
    fold_fraction,
    invert,
    jacobian_determinant,
    rotate180,
    translation,
    upsample,
    warp,
)


@pytest.fixture(scope="module")
def em(shared_data) -> torch.Tensor:
    """A real ISBI 2012 section, 256 x 320 crop, per-slice normalised: (1, 1, H, W)."""
    image = read_image(shared_data / "isbi2012" / "images" / "03.png")[0, 100:356, 50:370]
    image = image.astype(np.float32)
    return torch.from_numpy((image - image.mean()) / image.std())[None, None]


@pytest.mark.parametrize("shape", [(512, 512), (37, 61), (100, 130)])
def test_identity_warp_is_exact(shape):
    image = torch.rand(2, 3, *shape)
    assert torch.equal(warp(image, torch.zeros(2, 2, *shape)), image)


def test_known_translation_moves_a_pattern_by_exactly_that(em):
    dy, dx = 3, -5
    moved = warp(em, translation(dy, dx, *em.shape[-2:]))
    # pull convention: moved(y, x) = em(y + dy, x + dx)
    expected = em[..., 10 + dy : -10 + dy, 10 + dx : -10 + dx]
    torch.testing.assert_close(moved[..., 10:-10, 10:-10], expected, atol=1e-5, rtol=0)
    # a half-pixel shift is the mean of the two neighbours (bilinear)
    half = warp(em, translation(0.0, 0.5, *em.shape[-2:]))[..., 5:-5, 5:-5]
    torch.testing.assert_close(
        half, (em[..., 5:-5, 5:-5] + em[..., 5:-5, 6:-4]) / 2, atol=1e-5, rtol=0
    )


def test_warp_of_a_warp_is_the_warp_of_the_composition(em):
    h, w = em.shape[-2:]
    a = random_deformation((h, w), 6.0, np.random.default_rng(1))
    b = random_deformation((h, w), 6.0, np.random.default_rng(2))
    twice = warp(warp(em, b), a)
    once = warp(em, compose(a, b))
    inner = (slice(None), slice(None), slice(16, -16), slice(16, -16))
    # both resample bilinearly, so they agree up to the smoothing of one extra resampling
    assert (twice[inner] - once[inner]).abs().mean() < 0.1 * em.std()
    # for translations composition is exact: shifts add
    t = compose(translation(2, 3, h, w), translation(-5, 1, h, w))
    torch.testing.assert_close(t, translation(-3, 4, h, w))


def test_composition_order_matches_design():
    """DESIGN.md: D_ab(x) = D_b(x) + D_a(x + D_b(x)) is the field of "a, then b"."""
    h = w = 32
    yy = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1).expand(1, 1, h, w)
    a = torch.cat([0.1 * yy, torch.zeros_like(yy)], 1)  # a stretch along y
    b = translation(2.0, 0.0, h, w)
    d_ab = b + warp(a, b, padding="border")  # the formula, written out
    image = torch.rand(1, 1, h, w)
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))
    torch.testing.assert_close(
        warp(warp(image, a), b)[inner], warp(image, d_ab)[inner], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(compose(b, a), d_ab)
    assert (compose(a, b) - d_ab).abs().max() > 0.1  # the order matters


def test_resizing_a_field_rescales_its_values():
    field = translation(1.5, -2.0, 16, 24)
    up = upsample(field)
    assert up.shape == (1, 2, 32, 48)
    torch.testing.assert_close(up, translation(3.0, -4.0, 32, 48))
    torch.testing.assert_close(downsample(up), field)


def test_inverse_undoes_a_smooth_field():
    u = random_deformation((96, 96), 8.0, np.random.default_rng(3))
    v = invert(u)
    assert compose(v, u)[..., 12:-12, 12:-12].abs().max() < 0.05


def test_jacobian_finds_folds():
    assert torch.allclose(jacobian_determinant(torch.zeros(1, 2, 8, 8)), torch.ones(1, 8, 8))
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    mirror = torch.cat([torch.zeros_like(x), 15 - 2 * x], 1)  # x -> 15 - x: reversed
    assert fold_fraction(mirror) == 1.0 and fold_fraction(translation(3, 4, 16, 16)) == 0.0


def test_rigidity_is_zero_for_rigid_motions_and_positive_for_stretch():
    h = w = 24
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    t = math.radians(5)
    rotation = torch.stack(
        [math.cos(t) * yy - math.sin(t) * xx - yy, math.sin(t) * yy + math.cos(t) * xx - xx]
    )[None]
    assert rigidity_penalty(translation(7, -3, h, w)).abs().max() < 1e-9
    assert rigidity_penalty(rotation).abs().max() < 1e-5
    stretch = torch.stack([0.1 * yy, torch.zeros_like(xx)])[None]
    assert rigidity_penalty(stretch).mean() > 1e-3
    for name, penalty in PENALTIES.items():  # every penalty is zero for a translation
        assert penalty(translation(2, 1, h, w)).abs().max() < 1e-6, name


def test_rotate180_maps_a_field_to_its_rotated_pair(em):
    u = random_deformation(em.shape[-2:], 5.0, np.random.default_rng(4))
    source = warp(em, u)
    rotated = warp(torch.flip(em, (2, 3)), rotate180(u))
    torch.testing.assert_close(rotated, torch.flip(source, (2, 3)), atol=1e-4, rtol=0)

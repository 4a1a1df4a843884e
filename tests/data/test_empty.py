"""Tests of scarce.data.empty on real bbbc039 fields (training split) and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from scarce.data.empty import DEFAULT_MARGIN, empty_crop, empty_field
from scarce.data.normalize import noise_sigma, signal_to_noise
from scarce.demo import every_nth_split
from scarce.io import read_image, read_mask
from tests.shared import SHARED_DATA

BBBC = SHARED_DATA / "bbbc039"


def bbbc_fields(kind: str, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(image (1, H, W) uint16, instances (H, W))`` of the first fields of a split."""
    if not BBBC.is_dir():
        pytest.skip(f"bbbc039 not found at {BBBC}")
    split = every_nth_split(BBBC / "images")
    out = []
    for stem in split[kind]:
        truth = read_mask(BBBC / "masks" / f"{stem}.png")
        if kind == "train" or truth.max() == 0:
            out.append((read_image(BBBC / "images" / f"{stem}.png"), truth))
    return out[:count]


def test_objects_are_replaced_by_background_and_the_rest_is_kept():
    for image, truth in bbbc_fields("train", 3):
        out = empty_field(image, truth > 0, np.random.default_rng(0))
        assert out.dtype == image.dtype and out.shape == image.shape
        far = ndi.distance_transform_edt(truth == 0) > DEFAULT_MARGIN
        assert np.array_equal(out[0][far], image[0][far])  # the background is untouched
        sigma = noise_sigma(image.astype(np.float32))[0]
        background = np.median(image[0][far])
        before = image[0][truth > 0].astype(np.float64).mean() - background
        after = out[0][truth > 0].astype(np.float64).mean() - background
        assert before > 30 * sigma  # nuclei stood out...
        assert abs(after) < 2 * sigma  # ...and are gone, replaced by background level
        # the filled pixels carry the background's noise, not a flat fill
        filled = out[0][truth > 0].astype(np.float64)
        assert 0.5 < filled.std() / image[0][far].astype(np.float64).std() < 2


def test_an_emptied_field_looks_like_a_real_empty_field():
    """Signal-to-noise of emptied training fields against bbbc039's two real empty fields."""
    real = [signal_to_noise(image.astype(np.float32))[0] for image, _ in bbbc_fields("test", 2)]
    assert len(real) == 2 and max(real) < 20  # the real empty fields (about 8 and 10)
    for image, truth in bbbc_fields("train", 3):
        out = empty_field(image, truth > 0, np.random.default_rng(1))
        before = signal_to_noise(image.astype(np.float32))[0]
        after = signal_to_noise(out.astype(np.float32))[0]
        assert before > 100 and after < 3 * max(real), (before, after)


def test_empty_crop_follows_the_centre_and_zeroes_the_mask():
    image, truth = bbbc_fields("train", 1)[0]
    y, x = np.argwhere(truth > 0)[0]
    crop, mask, centre = empty_crop(
        image, truth, (float(y), float(x)), 256, np.random.default_rng(2)
    )
    assert crop.shape == (1, 256, 256) and mask.shape == (256, 256) and not mask.any()
    y0, x0 = y - centre[0], x - centre[1]  # where the crop starts in the image
    assert y0 == int(y0) and x0 == int(x0) and 0 <= y0 <= 520 - 256 and 0 <= x0 <= 696 - 256
    window = (slice(int(y0), int(y0) + 256), slice(int(x0), int(x0) + 256))
    expect = empty_field(
        image[:, window[0], window[1]], truth[window] > 0, np.random.default_rng(2)
    )
    assert np.array_equal(crop, expect)


def test_edge_cases_and_errors():
    rng = np.random.default_rng(0)
    image = rng.normal(100, 5, (2, 40, 50)).astype(np.float32)
    none = np.zeros((40, 50), bool)
    assert np.array_equal(empty_field(image, none, rng), image)  # nothing to remove
    assert empty_field(image, ~none, rng) is None  # nothing left to fill from
    mostly = np.ones((40, 50), bool)
    mostly[:5] = False  # 12 % background, under the 20 % needed
    assert empty_field(image, mostly, rng) is None
    assert empty_crop(image, mostly.astype(np.int32), (20.0, 25.0), 32, rng) is None
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        empty_field(image[0], none, rng)
    with pytest.raises(ValueError, match="objects must be"):
        empty_field(image, none[:10], rng)
    with pytest.raises(ValueError, match="margin"):
        empty_field(image, none, rng, margin=-1)
    # both channels are filled from the same background pixels (channel 1 = 2 x channel 0)
    pair = np.stack([image[0], 2 * image[0]])
    blob = np.zeros((40, 50), bool)
    blob[15:25, 20:30] = True
    pair[:, blob] += 1000
    out = empty_field(pair, blob, np.random.default_rng(3), margin=2, sigma=4.0)
    assert np.allclose(out[1], 2 * out[0], rtol=1e-5) and out[0][blob].max() < 150

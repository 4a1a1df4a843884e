"""Region-aware smoothing: a defect mask splits a section, and matches are averaged per side."""

from __future__ import annotations

import numpy as np
import torch

from scarce.models.matching import fill_specks, gaussian_smooth, region_smooth, regions_of


def _seam_valid(h: int = 32, w: int = 40) -> torch.Tensor:
    """Usable everywhere but a diagonal-stepping (8-connected) seam from top to bottom."""
    valid = torch.ones(1, 1, h, w)
    columns = 15 + (torch.arange(h) // 3)  # steps right every third row
    valid[0, 0, torch.arange(h), columns] = 0
    return valid


def test_an_eight_connected_seam_splits_a_section_into_two_regions():
    valid = _seam_valid()
    regions = regions_of(valid)
    assert regions.shape == (1, 32, 40) and regions.dtype == torch.int64
    assert sorted(torch.unique(regions).tolist()) == [0, 1, 2]
    assert (regions[valid[:, 0] == 0] == 0).all()  # the seam itself belongs to no region
    assert regions[0, 0, 0] != regions[0, 0, -1]  # left and right sides differ
    valid[0, 0, 5:8, 30:33] = 0
    valid[0, 0, 6, 31] = 1  # a 1-pixel island inside the hole
    assert regions_of(valid, min_size=2)[0, 6, 31] == 0  # too small: dropped


def test_smoothing_within_regions_keeps_a_tear_sharp():
    """A crack pulled the sides apart by 10 px: 0 on the left, 10 on the right."""
    valid = _seam_valid()
    regions = regions_of(valid)
    field = torch.zeros(1, 2, 32, 40)
    field[:, 1] = torch.where(regions[0] == regions[0, 0, -1], 10.0, 0.0)
    weight = valid.clone()
    sharp = region_smooth(field, weight, 4.0, regions)
    inside = regions[0] > 0
    torch.testing.assert_close(sharp[:, :, inside], field[:, :, inside])
    blurred = gaussian_smooth(field, weight, 4.0)
    assert (blurred - field)[:, 1, inside].abs().max() > 3.0  # plain smoothing drags both sides
    assert np.isfinite(sharp.numpy()).all()


def test_smoothing_on_region_boxes_equals_smoothing_on_the_whole_image():
    """Many small regions (scattered holes and seams): the bounding-box shortcut gives the
    numbers of smoothing each region over the whole image."""
    torch.manual_seed(3)
    valid = (torch.rand(1, 1, 48, 56) > 0.04).float()
    valid[0, 0, :, 20] = 0  # a straight seam
    valid[0, 0, 30, :] = 0  # and a crossing one: at least four regions
    regions = regions_of(valid, min_size=3)
    assert len(torch.unique(regions)) >= 5
    field, weight = torch.randn(1, 2, 48, 56), torch.rand(1, 1, 48, 56) * valid
    fast = region_smooth(field, weight, 3.0, regions)
    slow = gaussian_smooth(field, weight, 3.0)
    for label in torch.unique(regions).tolist():
        if label:
            inside = (regions == label)[:, None].float()
            whole = gaussian_smooth(field, weight * inside, 3.0)
            slow = torch.where(inside > 0, whole, slow)
    torch.testing.assert_close(fast, slow)


def test_specks_of_missing_pixels_are_filled_and_defects_kept():
    valid = torch.ones(1, 1, 40, 40)
    valid[0, 0, 3, 5] = valid[0, 0, 10, 30] = 0  # single pixels
    valid[0, 0, 20, 20:22] = valid[0, 0, 21, 22] = 0  # a 3-pixel diagonal speck
    valid[0, 0, 30:35, 5:10] = 0  # a 25-pixel hole: a defect
    filled = fill_specks(valid, 16)
    assert filled.dtype == torch.float32 and filled.shape == valid.shape
    assert filled[0, 0, :28].eq(1).all()  # every speck gone
    assert filled[0, 0, 30:35, 5:10].eq(0).all() and filled.sum() == 40 * 40 - 25

"""Synthetic defects, defect weights, voting and drift: what issue 12's stack alignment needs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scarce.align.defects import CRACK, FOLD, MISSING, crack, defect_weights, fold, missing
from scarce.align.vote import decay_drift, softmin_vote
from scarce.io import read_image
from scarce.models.field import rotate180, translation, warp


@pytest.fixture(scope="module")
def section(shared_data) -> np.ndarray:
    """A real ISBI 2012 section, 160 x 192, float32."""
    return read_image(shared_data / "isbi2012" / "images" / "11.png")[0, :160, :192].astype(
        np.float32
    )


def test_crack_sides_move_apart_by_exactly_the_width(section):
    rng = np.random.default_rng(0)
    d = crack(section, rng, width=12.0)
    assert d.mask.dtype == np.uint8 and set(np.unique(d.mask)) == {0, CRACK}
    for y in range(0, 160, 17):
        gap = np.flatnonzero(d.mask[y] == CRACK)
        assert gap.size == 12 and np.all(np.diff(gap) == 1)  # one contiguous 12 px gap
        a = d.field[1, y, gap[0] - 1]  # the left side moved left by a
        b = -d.field[1, y, gap[-1] + 1]  # the right side moved right by b
        assert a + b == pytest.approx(12.0) and a >= 0 and b >= 0
    # outside the crack the damaged slice is the slice warped by the field (integer a: exact)
    whole = crack(section, np.random.default_rng(1), width=10.0)
    expected = warp(
        torch.from_numpy(section)[None, None], torch.from_numpy(whole.field)[None], padding="border"
    )[0, 0].numpy()
    keep = whole.mask == 0
    np.testing.assert_allclose(whole.image[keep], expected[keep], atol=1e-4)


def test_fold_loses_the_band_and_moves_the_far_side(section):
    d = fold(section, np.random.default_rng(3), band=20.0)
    stripe = d.mask == FOLD
    assert 0 < stripe.mean() < 0.1
    lo = np.percentile(section, 1)
    assert np.allclose(d.image[stripe], lo)  # the doubled tissue is dark
    moved = np.hypot(d.field[0], d.field[1])
    assert np.allclose(moved[moved > 0], moved.max(), atol=1e-4)  # one shift, beyond the fold
    assert 14 - 1e-3 <= moved.max() <= 18 + 1e-3  # b - s with s in [2, 6]
    assert (moved > 0).mean() > 0.05 and (moved == 0).mean() > 0.05


def test_missing_data_is_one_constant_and_no_motion(section):
    d = missing(section, np.random.default_rng(5), value=-1.0)
    region = d.mask == MISSING
    assert region.any() and np.all(d.image[region] == -1.0) and not d.field.any()
    np.testing.assert_array_equal(d.image[~region], section[~region])


def test_mask_to_weights_on_a_hand_checked_case():
    mask = np.zeros((7, 7), np.uint8)
    mask[3, 3] = CRACK
    w = defect_weights(mask, radius=1, near=5.0, inside=0.0)[0, 0].numpy()
    expected = np.ones((7, 7))
    expected[2:5, 2:5] = 5.0  # within 1 px (square neighbourhood)
    expected[3, 3] = 0.0  # inside
    np.testing.assert_array_equal(w, expected)


def test_consensus_penalty_is_zero_for_a_field_and_its_180_degree_counterpart():
    rng = np.random.default_rng(0)
    field = torch.from_numpy(rng.normal(size=(1, 2, 16, 20)).astype(np.float32))
    counterpart = rotate180(field)  # what the rotated pair should give
    penalty = ((field - rotate180(counterpart)) ** 2).mean()
    assert float(penalty) == 0.0
    assert float(((field - rotate180(field)) ** 2).mean()) > 0.1


def test_vote_returns_the_majority_when_one_of_three_is_corrupted():
    truth = translation(2.0, -3.0, 24, 24)
    yy = torch.linspace(-1, 1, 24).view(1, 1, 24, 1).expand(1, 2, 24, 24)
    bad = translation(-6.0, 5.0, 24, 24) + 2 * yy  # a smooth but wrong field (a folded neighbour)
    near_truth = truth + 0.05
    for order in ([truth, near_truth, bad], [bad, truth, near_truth]):
        field, disagreement = softmin_vote(torch.stack(order))
        assert (field - truth).abs().max() < 0.1
        assert disagreement.max() < 0.2  # the agreeing pair is the trusted subset
    one, zero = softmin_vote(truth[None])
    assert torch.equal(one, truth) and not zero.any()


def test_drift_decay_removes_the_slow_part_only():
    h = w = 64
    slow = translation(4.0, 0.0, h, w)
    fast = torch.zeros(1, 2, h, w)
    fast[:, 1, :, ::2] = 1.0  # a one-pixel pattern: no low-pass content
    fast[:, 1, :, 1::2] = -1.0
    out = decay_drift(slow + fast, decay=0.5, sigma=8.0)
    inner = (slice(None), slice(None), slice(16, -16), slice(16, -16))
    assert torch.allclose(out[inner][:, 0], torch.full_like(out[inner][:, 0], 2.0), atol=1e-4)
    assert torch.allclose(out[inner][:, 1], fast[inner][:, 1], atol=0.05)
    assert torch.equal(decay_drift(slow, decay=0.0, sigma=8.0), slow)


def test_defect_dataset_is_whole_or_absent(section, tmp_path, monkeypatch):
    import errno

    import tifffile

    from scarce.align.defects import make_defect_dataset
    from scarce.errors import WriteError

    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.stack([section[:96, :96]] * 3))
    real, calls = tifffile.imwrite, []

    def imwrite(path, data, **kw):  # the disk fills up at the fifth file
        calls.append(path)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, **kw)

    monkeypatch.setattr(tifffile, "imwrite", imwrite)
    with pytest.raises(WriteError, match="no space left"):
        make_defect_dataset(stack, tmp_path / "defects", per_slice=1)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.tif"]  # no partial folder
    made = make_defect_dataset(stack, tmp_path / "defects", per_slice=1)
    assert made["samples"] == 6 and len(list((tmp_path / "defects" / "masks").glob("*.tif"))) == 6

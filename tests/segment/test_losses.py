"""Tests for scarce.segment.losses: class weights and segmentation losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scarce.segment.losses import SegmentationLoss, class_weights_from_counts


def test_class_weights_from_counts_inverse_frequency():
    weights = class_weights_from_counts({"0": 750, "1": 250, "255": 99}, 3)
    assert weights.dtype == np.float32 and np.isfinite(weights).all()
    assert weights[2] == 0.0  # no pixels, no inf
    assert weights[1] / weights[0] == pytest.approx(3.0)
    assert (750 * weights[0] + 250 * weights[1]) / 1000 == pytest.approx(1.0)
    assert class_weights_from_counts([5, 5], 2).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="no pixels"):
        class_weights_from_counts({"0": 0}, 2)
    with pytest.raises(ValueError, match="not a non-negative integer class id"):
        class_weights_from_counts({"bg": 3}, 2)


def _logits_and_target(seed=0, n=2, k=3, h=16, w=16):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, h, w, generator=gen)
    target = torch.randint(0, k, (n, h, w), generator=gen)
    return logits, target


def test_ce_with_ignore_label_equals_ce_on_the_subset():
    logits, target = _logits_and_target()
    target[:, :4] = 255
    keep = target != 255
    subset = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], target[keep])
    loss = SegmentationLoss("ce", 3, ignore_label=255)(logits, target)
    assert loss.item() == pytest.approx(subset.item(), rel=1e-6)


def test_ce_class_and_pixel_weights_follow_the_documented_normalisation():
    logits, target = _logits_and_target()
    class_weights = torch.tensor([0.5, 1.0, 2.0])
    pixel = torch.rand(target.shape, generator=torch.Generator().manual_seed(1))
    nll = -torch.log_softmax(logits, 1).gather(1, target[:, None])[:, 0]
    expected = (class_weights[target] * pixel * nll).mean()
    loss = SegmentationLoss("ce", 3, class_weights=class_weights)(logits, target, pixel)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("include_background", [False, True])
def test_dice_of_perfect_prediction_is_zero_and_of_wrong_one_near_one(include_background):
    _, target = _logits_and_target()
    perfect = 30.0 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    loss = SegmentationLoss("dice", 3, dice_include_background=include_background)
    assert loss(perfect, target).item() < 1e-4
    assert loss(perfect, (target + 1) % 3).item() > 0.99


def test_ignored_pixels_contribute_nothing_to_dice_ce():
    logits, target = _logits_and_target()
    target[0, 8:, :] = 255
    logits.requires_grad_(True)
    loss_fn = SegmentationLoss("dice_ce", 3, ignore_label=255)
    loss = loss_fn(logits, target)
    loss.backward()
    assert logits.grad[0, :, 8:, :].abs().max() == 0
    changed = logits.detach().clone()
    changed[0, :, 8:, :] = 100.0 * torch.randn(3, 8, 16)
    assert loss_fn(changed, target).item() == pytest.approx(loss.item(), rel=1e-6)


def test_loss_is_float32_under_bf16_autocast():
    logits, target = _logits_and_target()
    conv = torch.nn.Conv2d(3, 3, 1)
    loss_fn = SegmentationLoss("dice_ce", 3)
    reference = loss_fn(conv(logits), target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(logits)
        assert out.dtype == torch.bfloat16
        loss = loss_fn(out, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=2e-2)


def test_loss_errors():
    logits, target = _logits_and_target()
    with pytest.raises(ValueError, match="not one of"):
        SegmentationLoss("focal", 3)
    with pytest.raises(ValueError, match=r"logits must be \(N, 2, H, W\)"):
        SegmentationLoss("ce", 2)(logits, target)
    with pytest.raises(ValueError, match="outside 0..2"):
        SegmentationLoss("ce", 3)(logits, target.masked_fill(target == 0, 7))
    with pytest.raises(ValueError, match="target must be"):
        SegmentationLoss("ce", 3)(logits, target[:, :8])
    with pytest.raises(ValueError, match="class_weights must be 3 finite"):
        SegmentationLoss("ce", 3, class_weights=torch.tensor([1.0, float("inf"), 1.0]))

"""Tests of scarce.segment.metrics: metric values worked out by hand on small label images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scarce.segment.metrics import (
    DEFAULT_THRESHOLDS,
    confusion_matrix,
    match_instances,
    object_metrics,
    pixel_metrics,
    rand_error,
    sum_counts,
)


def square(shape=(30, 30), top=5, left=5, side=10, value=1):
    out = np.zeros(shape, dtype=np.int64)
    out[top : top + side, left : left + side] = value
    return out


def test_default_thresholds():
    assert DEFAULT_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_confusion_matrix_counts_rows_truth_columns_pred_numpy_and_torch():
    truth = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    expected = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]])
    np.testing.assert_array_equal(confusion_matrix(truth, pred, 3), expected)
    got = confusion_matrix(torch.from_numpy(truth), torch.from_numpy(pred).to(torch.uint8), 3)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(confusion_matrix(torch.from_numpy(truth), pred, 3), expected)


def test_confusion_matrix_skips_ignore_label_and_rejects_bad_labels():
    truth = np.array([[0, 255, 1], [255, 1, 1]], dtype=np.uint8)
    pred = np.array([[0, 1, 1], [0, 0, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(
        confusion_matrix(truth, pred, 2, ignore_label=255), [[1, 0], [1, 2]]
    )
    with pytest.raises(ValueError, match="truth labels must lie in 0..1"):
        confusion_matrix(truth, pred, 2)
    with pytest.raises(ValueError, match="pred labels must lie in 0..1"):
        confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 2), 2)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 2)
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 2), int), 2)


def test_pixel_metrics_shifted_square_by_hand():
    # 10x10 square shifted 2 px right: overlap 80 px, union 120 px, 900 px in all.
    truth, pred = square(), square(left=7)
    m = pixel_metrics(confusion_matrix(truth, pred, 2))
    assert m["pixel_accuracy"] == pytest.approx(860 / 900)
    assert m["pixel_error"] == pytest.approx(40 / 900)
    assert m["per_class"][1]["iou"] == pytest.approx(80 / 120)
    assert m["per_class"][1]["dice"] == pytest.approx(160 / 200)
    assert m["per_class"][0]["iou"] == pytest.approx(780 / 820)
    assert m["mean_iou"] == pytest.approx(80 / 120)  # foreground classes only
    counts = match_instances(truth, pred, (0.5, 0.65, 0.7))
    assert counts[0.65]["matched_ious"] == [pytest.approx(2 / 3)]
    assert (counts[0.7]["tp"], counts[0.7]["fp"], counts[0.7]["fn"]) == (0, 1, 1)


def test_pixel_metrics_class_absent_from_truth_is_zero_absent_from_both_is_none():
    truth = np.array([[1, 1, 0, 0]] * 4)
    pred = truth.copy()
    pred[0, 3] = 2  # class 2 predicted but never true; class 3 nowhere
    m = pixel_metrics(confusion_matrix(truth, pred, 4))
    ious = [e["iou"] for e in m["per_class"]]
    assert ious[1] == 1.0 and ious[2] == 0.0 and ious[3] is None
    assert m["per_class"][3]["dice"] is None
    assert m["mean_iou"] == pytest.approx(0.5)  # (1 + 0) / 2: class 3 left out
    assert m["per_class"][0]["iou"] == pytest.approx(7 / 8)


def test_pixel_metrics_without_foreground_or_pixels_is_none():
    m = pixel_metrics(np.array([[16, 0], [0, 0]]))
    assert m["pixel_accuracy"] == 1.0 and m["mean_iou"] is None and m["mean_dice"] is None
    assert pixel_metrics(np.array([[5]]))["mean_iou"] is None  # K == 1: no foreground
    empty = pixel_metrics(np.zeros((2, 2), int))
    assert empty["pixel_accuracy"] is None and empty["pixel_error"] is None
    with pytest.raises(ValueError, match="square"):
        pixel_metrics(np.zeros((2, 3)))


def test_perfect_prediction():
    truth = square() + square(top=18, left=18, side=6, value=2)
    counts = match_instances(truth, truth)
    metrics = object_metrics(counts)
    assert all(
        v["f1"] == 1.0 and v["tp"] == 2 and v["fp"] == v["fn"] == 0 for v in metrics.values()
    )
    assert rand_error(truth, truth) == 0.0
    assert pixel_metrics(confusion_matrix(truth, truth, 3))["mean_iou"] == 1.0


def test_empty_truth_and_prediction_are_defined():
    empty = np.zeros((8, 8), int)
    both = object_metrics(match_instances(empty, empty, (0.5,)))[0.5]
    assert both == {
        "tp": 0,
        "fp": 0,
        "fn": 0,
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
        "ap": 1.0,
        "mean_matched_iou": None,
    }
    assert rand_error(empty, empty) == 0.0
    spurious = object_metrics(match_instances(empty, square((8, 8), 1, 1, 3), (0.5,)))[0.5]
    assert (spurious["fp"], spurious["precision"], spurious["recall"], spurious["ap"]) == (
        1,
        0.0,
        0.0,
        0.0,
    )
    assert rand_error(empty, square((8, 8), 1, 1, 3)) == 1.0
    missed = object_metrics(match_instances(square((8, 8), 1, 1, 3), empty, (0.5,)))[0.5]
    assert (missed["fn"], missed["precision"], missed["recall"], missed["f1"]) == (1, 0.0, 0.0, 0.0)


def test_one_object_split_into_two_halves():
    truth = square((12, 12), 1, 1, 10)
    pred = truth.copy()
    pred[:, 6:] *= 2  # two 5x10 halves: each has IoU 50/100 = 0.5 with the truth
    counts = match_instances(truth, pred, (0.5, 0.55))
    # Rule ">=": exactly 0.5 matches, so one half is a TP and the other an FP.
    assert (counts[0.5]["tp"], counts[0.5]["fp"], counts[0.5]["fn"]) == (1, 1, 0)
    assert counts[0.5]["matched_ious"] == [0.5]
    assert (counts[0.55]["tp"], counts[0.55]["fp"], counts[0.55]["fn"]) == (0, 2, 1)
    m = object_metrics(counts)[0.5]
    assert (m["precision"], m["recall"], m["f1"], m["ap"]) == pytest.approx((0.5, 1, 2 / 3, 0.5))
    # Rand: pairs in both 2*(50*49)=4900, truth 100*99=9900, pred 4900 -> 1 - 4900/7400.
    assert rand_error(truth, pred) == pytest.approx(25 / 74)


def test_merged_pair():
    truth = np.zeros((8, 12), int)
    truth[2:6, 1:5], truth[2:6, 7:11] = 1, 2  # two 4x4 objects, 2 px apart
    pred = np.zeros_like(truth)
    pred[2:6, 1:11] = 7  # one 4x10 object over both: IoU 16/40 = 0.4 with each
    counts = match_instances(truth, pred, (0.4, 0.5))
    assert (counts[0.5]["tp"], counts[0.5]["fp"], counts[0.5]["fn"]) == (0, 1, 2)
    assert (counts[0.4]["tp"], counts[0.4]["fp"], counts[0.4]["fn"]) == (1, 0, 1)
    # Rand: pairs in both 2*16*15=480, truth 480, pred 32*31=992 -> 1 - 480/736.
    assert rand_error(truth, pred) == pytest.approx(256 / 736)


def test_matching_with_sparse_ids_and_many_objects():
    # 3000 one-pixel objects with ids up to 3e6 take the np.unique overlap path.
    truth = np.zeros((60, 100), dtype=np.int64)
    truth[::2, :] = (np.arange(3000) * 1000 + 7).reshape(30, 100)
    pred = np.where(truth > 0, truth // 1000 + 1, 0)
    pred[0, 0] = 0  # one object missed
    c = match_instances(truth, pred, (0.5, 0.95))
    assert (c[0.95]["tp"], c[0.95]["fp"], c[0.95]["fn"]) == (2999, 0, 1)


def test_match_instances_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        match_instances(square(), square(), (0.0,))
    with pytest.raises(ValueError, match="negative"):
        match_instances(-square(), square())
    with pytest.raises(ValueError, match="shape"):
        match_instances(square((5, 5)), square((6, 6)))


def test_object_metrics_sums_counts_over_images_before_ratios():
    a = {0.5: {"tp": 9, "fp": 1, "fn": 0, "matched_ious": [0.8] * 9}}
    b = {0.5: {"tp": 0, "fp": 0, "fn": 10, "matched_ious": []}}
    m = object_metrics([a, b])[0.5]
    assert (m["tp"], m["fp"], m["fn"]) == (9, 1, 10)
    assert m["precision"] == pytest.approx(0.9) and m["recall"] == pytest.approx(9 / 19)
    assert m["f1"] == pytest.approx(18 / 29) and m["ap"] == pytest.approx(0.45)
    assert m["mean_matched_iou"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="thresholds differ"):
        sum_counts([a, {0.6: a[0.5]}])

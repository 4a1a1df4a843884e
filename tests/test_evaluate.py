"""Tests of scarce.evaluate: metric values worked out by hand, folder evaluation on BBBC039."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from skimage.segmentation import find_boundaries

from scarce.evaluate import (
    DEFAULT_THRESHOLDS,
    EvaluationError,
    confusion_matrix,
    evaluate_arrays,
    evaluate_folders,
    format_summary,
    label_components,
    match_instances,
    object_metrics,
    pixel_metrics,
    rand_error,
    sum_counts,
    to_instances,
)
from scarce.io import list_image_files, read_mask

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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
    np.testing.assert_array_equal(confusion_matrix(truth, pred, 2, ignore_label=255),
                                  [[1, 0], [1, 2]])
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
    assert all(v["f1"] == 1.0 and v["tp"] == 2 and v["fp"] == v["fn"] == 0
               for v in metrics.values())
    assert rand_error(truth, truth) == 0.0
    assert pixel_metrics(confusion_matrix(truth, truth, 3))["mean_iou"] == 1.0


def test_empty_truth_and_prediction_are_defined():
    empty = np.zeros((8, 8), int)
    both = object_metrics(match_instances(empty, empty, (0.5,)))[0.5]
    assert both == {"tp": 0, "fp": 0, "fn": 0, "precision": 1.0, "recall": 1.0, "f1": 1.0,
                    "ap": 1.0, "mean_matched_iou": None}
    assert rand_error(empty, empty) == 0.0
    spurious = object_metrics(match_instances(empty, square((8, 8), 1, 1, 3), (0.5,)))[0.5]
    assert (spurious["fp"], spurious["precision"], spurious["recall"], spurious["ap"]) == (
        1, 0.0, 0.0, 0.0)
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


def test_label_components_and_to_instances():
    class_map = np.zeros((10, 10), np.uint8)
    class_map[1:3, 1:3] = 1
    class_map[3:5, 3:5] = 1  # touches the first only diagonally
    class_map[7:9, 1:9] = 2
    labels = label_components(class_map)
    assert labels.dtype == np.int32 and labels.max() == 3
    assert label_components(class_map, connectivity=2).max() == 2
    class_map[1:3, 6:8] = 1  # value 1 now in two 8-connected pieces: read as a class map
    assert to_instances(class_map, "auto").max() == 4
    instances = np.zeros((10, 10), np.uint16)
    instances[1:5, 1:3], instances[1:5, 3:5] = 4, 9  # touching objects stay apart
    np.testing.assert_array_equal(to_instances(instances, "auto"), instances)
    assert to_instances(instances, "classes").max() == 1
    with pytest.raises(ValueError, match="kind"):
        to_instances(instances, "semantic")


def test_evaluate_arrays_class_maps_ignore_and_inferred_classes():
    truth = square(value=2)
    truth[0, :] = 255
    pred = square(left=7, value=2)
    pred[0, :] = 1  # wrong, but inside ignored pixels
    metrics, rows = evaluate_arrays([("a", truth, pred), ("b", square(), square())],
                                    ignore_label=255)
    assert metrics["num_classes"] == 3 and metrics["num_images"] == 2
    conf = confusion_matrix(truth, pred, 3, 255) + confusion_matrix(square(), square(), 3)
    assert metrics["per_class"][2]["iou"] == pytest.approx(80 / 120)
    assert metrics["pixel_accuracy"] == pytest.approx(np.trace(conf) / conf.sum())
    assert metrics["mean_iou"] == pytest.approx((1.0 + 80 / 120) / 2)
    assert rows[1]["rand_error"] == 0.0 and rows[0]["rand_error"] > 0
    assert metrics["rand_error"] == pytest.approx(rows[0]["rand_error"] / 2)
    assert "objects" not in metrics
    with pytest.raises(ValueError, match="^a: pred labels must lie"):
        evaluate_arrays([("a", square(), square(value=3))], num_classes=2)
    with pytest.raises(ValueError, match="no .* pairs"):
        evaluate_arrays([])


def test_evaluate_arrays_instances_and_summary():
    truth = square() + square(top=18, left=18, side=6, value=2)
    metrics, rows = evaluate_arrays([("x", truth, (truth > 0).astype(np.uint8))], instances=True)
    assert metrics["num_classes"] == 2 and metrics["pixel_accuracy"] == 1.0
    assert metrics["objects"]["0.95"]["tp"] == 2 and metrics["mean_ap"] == 1.0
    assert rows[0] == {"image": "x", "pixel_accuracy": 1.0, "mean_iou": 1.0, "mean_dice": 1.0,
                       "rand_error": 0.0, "matched": 2, "truth_objects": 2,
                       "predicted_objects": 2, "f1_0.50": 1.0}
    text = format_summary(metrics)
    assert "pixel accuracy 1.0000" in text and "0.95" in text and "class 1: IoU 1.0000" in text


def bbbc039_masks(n=3):
    folder = DATA / "bbbc039" / "masks"
    if not folder.is_dir():
        pytest.skip(f"real data not found at {folder}")
    return [(p.stem, read_mask(p)) for p in list_image_files(folder)[:n]]


def write_folder(folder: Path, masks) -> Path:
    folder.mkdir()
    for stem, mask in masks:
        tifffile.imwrite(folder / f"{stem}.tif", mask)
    return folder


def test_evaluate_folders_bbbc039_perfect_and_eroded(tmp_path):
    masks = bbbc039_masks()
    truth_dir = write_folder(tmp_path / "truth", masks)
    perfect = evaluate_folders(write_folder(tmp_path / "same", masks), truth_dir,
                               tmp_path / "out_same", instances=True)
    assert perfect["objects"]["0.95"]["f1"] == 1.0 and perfect["rand_error"] == 0.0
    eroded = [(s, np.where(find_boundaries(m, mode="inner"), 0, m)) for s, m in masks]
    out = tmp_path / "out"
    metrics = evaluate_folders(write_folder(tmp_path / "eroded", eroded), truth_dir, out,
                               instances=True)
    # Expected independently: an eroded nucleus is inside its original, so IoU = kept / area.
    expected_tp = {0.5: 0, 0.95: 0}
    for (_, m), (_, e) in zip(masks, eroded):
        ratio = np.bincount(e.ravel(), minlength=m.max() + 1)[1:] / np.bincount(m.ravel())[1:]
        for thr in expected_tp:
            expected_tp[thr] += int(np.count_nonzero(ratio >= thr))
    assert metrics["objects"]["0.50"]["tp"] == expected_tp[0.5]
    assert metrics["objects"]["0.50"]["f1"] > 0.95  # only tiny fragments are lost at 0.5
    assert metrics["objects"]["0.95"]["tp"] == expected_tp[0.95]
    assert metrics["objects"]["0.95"]["f1"] < 0.2
    on_disk = json.loads((out / "metrics.json").read_text())
    for key in ("pixel_accuracy", "pixel_error", "rand_error", "mean_iou", "mean_dice",
                "per_class", "objects", "num_images", "num_classes"):
        assert on_disk[key] == metrics[key]
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [s for s, _ in masks]
    for row, (_, m) in zip(rows, masks):
        assert int(row["truth_objects"]) == int(row["predicted_objects"]) == m.max()
        assert float(row["pixel_accuracy"]) < 1.0 and 0.9 < float(row["f1_0.50"]) <= 1.0
    assert not list(out.glob(".*tmp"))


def test_evaluate_folders_reports_every_problem_in_one_error(tmp_path):
    a, b = square((20, 20)), square((20, 20), 2, 2, 5)
    truth_dir = write_folder(tmp_path / "truth", [("a", a), ("b", b), ("c", a)])
    pred_dir = write_folder(tmp_path / "pred", [("a", a), ("b", b[:, :15])])
    with pytest.raises(EvaluationError) as info:
        evaluate_folders(pred_dir, truth_dir, tmp_path / "out")
    problems = info.value.problems
    assert len(problems) == 2
    assert any(str(truth_dir / "c.tif") in p and "no prediction" in p for p in problems)
    assert any(str(pred_dir / "b.tif") in p and "(20, 15)" in p for p in problems)
    assert not (tmp_path / "out").exists()


def test_evaluate_folders_uses_predict_companion_files(tmp_path):
    truth = square((20, 20), 2, 2, 6) + square((20, 20), 2, 8, 6, value=2)  # touching pair
    class_map = (truth > 0).astype(np.uint8)  # its components merge the pair into one object
    truth_dir = write_folder(tmp_path / "truth", [("a", truth)])
    pred_dir = write_folder(tmp_path / "pred", [("a", class_map), ("a_instances", truth)])
    tifffile.imwrite(pred_dir / "a_prob.tif", np.zeros((2, 20, 20), np.float32))
    semantic = evaluate_folders(pred_dir, truth_dir)
    assert semantic["num_classes"] == 3 and "objects" not in semantic  # truth has labels 1, 2
    objects = evaluate_folders(pred_dir, truth_dir, instances=True)["objects"]["0.50"]
    assert (objects["tp"], objects["fp"], objects["fn"]) == (2, 0, 0)  # a_instances was used
    (pred_dir / "a_instances.tif").unlink()
    objects = evaluate_folders(pred_dir, truth_dir, instances=True)["objects"]["0.50"]
    # The class map's one 6x12 blob has IoU 36/72 = 0.5 with each: one match (rule >=).
    assert (objects["tp"], objects["fp"], objects["fn"]) == (1, 0, 1)

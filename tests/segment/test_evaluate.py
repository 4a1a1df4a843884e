"""Tests of scarce.segment.evaluate: many images, folder evaluation on BBBC039."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.segmentation import find_boundaries

from scarce.io import list_image_files, read_mask
from scarce.segment.evaluate import (
    EvaluationError,
    confusion_matrix,
    evaluate_arrays,
    evaluate_folders,
    format_summary,
    label_components,
    to_instances,
)
from tests.shared import SHARED_DATA

DATA = SHARED_DATA


def square(shape=(30, 30), top=5, left=5, side=10, value=1):
    out = np.zeros(shape, dtype=np.int64)
    out[top : top + side, left : left + side] = value
    return out


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
    metrics, rows = evaluate_arrays(
        [("a", truth, pred), ("b", square(), square())], ignore_label=255
    )
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
    assert rows[0] == {
        "image": "x",
        "pixel_accuracy": 1.0,
        "mean_iou": 1.0,
        "mean_dice": 1.0,
        "rand_error": 0.0,
        "matched": 2,
        "truth_objects": 2,
        "predicted_objects": 2,
        "f1_0.50": 1.0,
    }
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
    perfect = evaluate_folders(
        write_folder(tmp_path / "same", masks), truth_dir, tmp_path / "out_same", instances=True
    )
    assert perfect["objects"]["0.95"]["f1"] == 1.0 and perfect["rand_error"] == 0.0
    eroded = [(s, np.where(find_boundaries(m, mode="inner"), 0, m)) for s, m in masks]
    out = tmp_path / "out"
    metrics = evaluate_folders(
        write_folder(tmp_path / "eroded", eroded), truth_dir, out, instances=True
    )
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
    for key in (
        "pixel_accuracy",
        "pixel_error",
        "rand_error",
        "mean_iou",
        "mean_dice",
        "per_class",
        "objects",
        "num_images",
        "num_classes",
    ):
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

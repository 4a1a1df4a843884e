"""Tests for scarce.segment.targets: class maps from masks, border weights, number of classes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from scarce.io import list_image_files, read_mask
from scarce.segment.targets import (
    border_weight_map,
    derive_target,
    instances_to_target,
    num_target_classes,
)
from tests.shared import SHARED_DATA

DATA = SHARED_DATA


def touching_squares() -> np.ndarray:
    """Two 10x10 squares sharing the edge between columns 14 and 15, on a 32x32 background."""
    labels = np.zeros((32, 32), dtype=np.uint16)
    labels[5:15, 5:15] = 1
    labels[5:15, 15:25] = 2
    return labels


def bbbc039_crop(size: int = 256) -> np.ndarray:
    root = DATA / "bbbc039" / "masks"
    if not root.is_dir():
        pytest.skip(f"real data not found at {root}")
    return read_mask(list_image_files(root)[1])[:size, :size]


def test_boundary_target_separates_touching_squares():
    target = instances_to_target(touching_squares(), "boundary", boundary_width=2)
    assert target.dtype == np.uint8
    assert set(np.unique(target)) == {0, 1, 2}
    assert (target[5:15, 13:17] == 2).all()  # 2 px on each side of the shared edge
    assert (target[7:13, 7:13] == 1).all() and (target[7:13, 17:23] == 1).all()
    assert (target[7:13, 12] == 1).all()  # 3 px from the other square: interior
    _, count = ndimage.label(target == 1)
    assert count == 2  # the interiors no longer touch
    semantic = instances_to_target(touching_squares(), "semantic")
    assert semantic.sum() == 200 and semantic.max() == 1


def test_boundary_width_sets_thickness_and_image_edge_is_not_boundary():
    labels = np.zeros((20, 20), dtype=np.int32)
    labels[:, :10] = 3  # touches the image's left, top and bottom edges
    row = instances_to_target(labels, "boundary", boundary_width=3)[10]
    assert row[:7].tolist() == [1] * 7 and row[7:10].tolist() == [2] * 3


def test_boundary_target_on_real_nuclei_splits_every_touching_pair():
    labels = bbbc039_crop()
    target = instances_to_target(labels, "boundary")
    interiors, count = ndimage.label(target == 1)
    for i in range(1, count + 1):  # no interior component spans two nuclei
        assert len(np.unique(labels[interiors == i])) == 1
    assert ((target > 0) == (labels > 0)).all()


def test_target_errors():
    with pytest.raises(ValueError, match="rule = 'edges'"):
        instances_to_target(touching_squares(), "edges")
    with pytest.raises(ValueError, match="boundary_width must be a positive integer"):
        instances_to_target(touching_squares(), "boundary", boundary_width=0)
    with pytest.raises(ValueError, match="must hold integers; got dtype float32"):
        instances_to_target(np.zeros((4, 4), np.float32), "semantic")
    with pytest.raises(ValueError, match=r"2-D \(H, W\); got shape \(1, 4, 4\)"):
        instances_to_target(np.zeros((1, 4, 4), np.uint8), "semantic")


def test_border_weights_peak_between_close_objects():
    labels = np.zeros((64, 64), dtype=np.int32)
    labels[10:20, 10:20] = 1
    labels[10:20, 22:32] = 2  # 2-pixel gap: columns 20 and 21
    weights = border_weight_map(labels, w0=10.0, sigma=5.0, class_weights=[1.0, 2.0])
    assert weights.dtype == np.float32 and weights.shape == labels.shape
    gap = 1.0 + 10.0 * np.exp(-((1.0 + 2.0) ** 2) / 50.0)  # d1 = 1, d2 = 2
    assert weights[15, 20] == pytest.approx(gap, rel=1e-5)
    assert weights[15, 20] == weights[labels == 0].max()
    assert weights[60, 60] == pytest.approx(1.0, abs=1e-3)  # far from both: w_c
    assert (weights[labels > 0] == 2.0).all()  # objects: class weight only


def test_border_weights_match_brute_force_on_real_nuclei():
    labels = bbbc039_crop()
    ids = [i for i in np.unique(labels) if i]
    dist = np.sort(np.stack([ndimage.distance_transform_edt(labels != i) for i in ids]), axis=0)
    expected = 1.0 + np.where(labels == 0, 10.0 * np.exp(-((dist[0] + dist[1]) ** 2) / 50.0), 0)
    weights = border_weight_map(labels)
    assert np.abs(weights - expected).max() < 10.0 * np.exp(-8.0)


def test_derive_target_rules():
    instances = touching_squares()
    assert derive_target(instances, "instance", "auto").max() == 1
    assert (derive_target(instances, "instance", "class") == (instances > 0)).all()
    boundary = derive_target(instances, "instance", "boundary")
    assert boundary.dtype == np.uint8 and boundary.max() == 2
    classes = (instances > 0).astype(np.uint8) * 3
    assert derive_target(classes, "class", "auto") is classes
    assert derive_target(classes, "class", "semantic").max() == 1
    # a class mask's one region of class 3 becomes one object: no split between squares
    as_objects = derive_target(classes, "class", "boundary")
    assert (as_objects[7:13, 13:17] == 1).all() and as_objects[5, 10] == 2


def test_derive_target_keeps_the_ignore_label():
    instances = touching_squares()
    instances[0:3, :] = 300
    target = derive_target(instances, "instance", "boundary", ignore_label=300)
    assert target.dtype == np.uint16
    assert (target[0:3] == 300).all()
    assert set(np.unique(target[3:])) == {0, 1, 2}
    with pytest.raises(ValueError, match="mask_kind = 'labels'"):
        derive_target(instances, "labels", "auto")


def test_num_target_classes():
    classes = {"mask_kind": "class", "class_ids": [0, 1, 4, 255]}
    assert num_target_classes(classes, "auto", ignore_label=255) == 5
    assert num_target_classes(classes, "semantic") == 2
    assert num_target_classes(classes, "boundary") == 3
    assert num_target_classes({"mask_kind": "instance", "class_ids": [0, 1]}, "auto") == 2
    assert num_target_classes({"mask_kind": "class", "class_ids": [0]}, "class") == 2
    with pytest.raises(ValueError, match="mask_kind = None"):
        num_target_classes({}, "auto")
    with pytest.raises(ValueError, match="no 'class_ids'"):
        num_target_classes({"mask_kind": "class"}, "auto")

"""Working scale: resampling, the scale table, and downscaled training undone at predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scarce.config import override
from scarce.data.normalize import normalization_spec, normalize
from scarce.data.store import SampleStore, read_metadata
from scarce.engine.checkpoint import load_checkpoint
from scarce.segment.predict import predict_image
from scarce.segment.readers import make_train_loader
from scarce.segment.scale import (
    downscale_image,
    downscale_labels,
    object_diameters,
    relative_factor,
    scale_ceiling,
    scale_table,
    upsample_logits,
)
from scarce.segment.task import train
from tests.engine.test_trainer import tiny_config


def disks(shape, centres, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, np.uint16)
    for label, (cy, cx) in enumerate(centres, 1):
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = label
    return mask


def test_resampling_shapes_values_and_identity():
    image = np.arange(2 * 9 * 12, dtype=np.uint16).reshape(2, 9, 12)
    assert downscale_image(image, 1) is image
    small = downscale_image(image, 3)
    assert small.shape == (2, 3, 4) and small.dtype == np.float32
    assert small[0, 0, 0] == pytest.approx(image[0, :3, :3].mean())  # area average
    labels = np.random.default_rng(0).integers(0, 7, (10, 14)).astype(np.uint16)
    down = downscale_labels(labels, 2)
    assert (
        down.shape == (5, 7) and down.dtype == np.uint16 and set(np.unique(down)) <= set(range(7))
    )
    np.testing.assert_array_equal(downscale_labels(down, shape=(10, 14))[::2, ::2], down)
    logits = torch.randn(3, 5, 7)
    assert upsample_logits(logits, (10, 14)).shape == (3, 10, 14)
    assert relative_factor(1.0, 0.5, 2.0) == 2.0 and relative_factor(None, 0.5, 3.0) == 3.0


def test_object_sizes_of_instances_and_class_components():
    mask = disks((64, 64), [(16, 16), (45, 45)], 8)
    d = object_diameters(mask, "instance")
    assert len(d) == 2 and d == pytest.approx([16.0, 16.0], rel=0.1)
    assert len(object_diameters((mask > 0).astype(np.uint8), "class")) == 2


def test_scale_ceiling_loses_small_objects_but_keeps_large_ones():
    big = disks((120, 120), [(30, 30), (80, 85)], 20)
    small = disks((120, 120), [(10 + 12 * i, 10 + 12 * j) for i in range(9) for j in range(9)], 2)
    for mask in (big, small):
        assert scale_ceiling([mask], "instance", 1) == {"factor": 1, "dice": 1.0, "object_f1": 1.0}
    rows = {r["factor"]: r for r in scale_table([big], "instance", (2, 4))}
    assert rows[2]["object_f1"] == 1.0 and rows[4]["dice"] > 0.97
    tiny = scale_ceiling([small], "instance", 6)  # 5-px objects on a 6-px grid vanish or blur
    assert tiny["object_f1"] < 0.8 and tiny["dice"] < 0.9
    cls = scale_ceiling([(small > 0).astype(np.uint8)], "class", 2)
    assert "object_f1" not in cls and 0 < cls["dice"] < 1


def test_downscaled_training_is_recorded_and_undone_at_predict(nist_db, tmp_path):
    cfg = tiny_config(max_steps=2, test_every_n_steps=2, **{"data.downscale": 2.0})
    train(nist_db / "train.lmdb", nist_db / "test.lmdb", tmp_path / "run", cfg)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["extras"]["scale"] == {"downscale": 2.0, "pixel_size_um": None}
    from scarce.engine.checkpoint import load_model

    model, ckpt = load_model(tmp_path / "run" / "checkpoints" / "last.pt")
    image = np.random.default_rng(0).integers(500, 5000, (1, 100, 130)).astype(np.uint16)
    probs = predict_image(model, image, ckpt)
    assert probs.shape == (2, 100, 130)  # logits enlarged back to the image
    # a pixel size that says the image is already at the model's scale: no shrinking
    ckpt["extras"]["scale"]["pixel_size_um"] = 1.0
    assert predict_image(model, image, ckpt, pixel_size_um=1.0).shape == (2, 100, 130)


def test_readers_cut_patches_from_downscaled_images(nist_db):
    db = nist_db / "train.lmdb"
    cfg = override(
        tiny_config(), {"data.downscale": 4.0, "data.patch_size": 64, "augment.enabled": False}
    )
    spec = normalization_spec(cfg.data.normalization, cfg.data.percentiles, read_metadata(db))
    with make_train_loader(db, cfg, norm_spec=spec) as batches:
        batch = next(batches)
    assert batch["image"].shape == (2, 1, 64, 64)
    # 256-px images shrunk by 4 are 64 px: an exact crop of 64 px is a whole shrunk image,
    # normalised with the full-resolution statistics (as the evaluation does)
    with SampleStore(db) as store:
        expected = [downscale_image(normalize(store[i].image, spec), 4) for i in range(len(store))]
        masks = [downscale_labels(store[i].mask, 4) for i in range(len(store))]
    patch, target = batch["image"][0].numpy(), batch["target"][0].numpy()
    match = [i for i, e in enumerate(expected) if np.allclose(e, patch, atol=1e-4)]
    assert match and np.array_equal(masks[match[0]], target)

"""Checkpoint format: version 2 records the task; version-1 files (Scarce 0.1) still load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from scarce.engine.checkpoint import FORMAT_VERSION, load_checkpoint, load_model
from scarce.io import read_image
from scarce.segment.predict import predict_files, predict_image
from scarce.segment.task import target_of

V1 = Path(__file__).parent / "fixtures" / "v1_unet_nist_rpe.pt"  # written by commit aa0791b


def test_version_1_file_is_what_we_think_it_is():
    raw = torch.load(V1, weights_only=True)
    assert raw["format_version"] == 1 and "task" not in raw and "extras" not in raw
    assert raw["target"] == "class" and raw["model"]["in_channels"] == 1


def test_version_1_checkpoint_loads_as_segmentation(shared_data, tmp_path):
    ckpt = load_checkpoint(V1)
    assert ckpt["format_version"] == FORMAT_VERSION == 2 and ckpt["task"] == "segment"
    target = target_of(ckpt)
    assert (target.rule, target.mask_kind, target.num_classes) == ("class", "class", 2)
    assert target.class_names == ("class0", "class1") and target.ignore_label is None
    assert ckpt["extras"]["normalization"]["mode"] == "zscore"
    model, ckpt = load_model(V1)
    assert model.arguments == {"in_channels": 1, "num_classes": 2, **model.options}
    assert ckpt["step"] == 2 and "optimizer" in ckpt  # training state survives: resumable
    image = read_image(
        shared_data
        / "nist_rpe"
        / "images"
        / sorted(p.name for p in (shared_data / "nist_rpe" / "images").iterdir())[0]
    )
    probs = predict_image(model, image, ckpt, tile_size=128)
    assert probs.shape == (2, *image.shape[1:])
    np.testing.assert_allclose(probs.sum(0).numpy(), 1.0, atol=1e-5)
    rows = predict_files(
        V1,
        shared_data
        / "nist_rpe"
        / "images"
        / sorted(p.name for p in (shared_data / "nist_rpe" / "images").iterdir())[0],
        tmp_path,
        progress=False,
    )
    assert Path(rows[0]["class_map"]).is_file()

"""The segmentation task: its target is resolved once and evaluation honours the ignore label."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
import yaml

from scarce.config import TrainConfig, override
from scarce.data.ingest import ingest
from scarce.engine import distributed
from scarce.engine.task import Runtime
from scarce.io import list_image_files, read_image, read_mask, stem_of
from scarce.segment.task import SegmentationTask

IGNORE = 9999


class AllForeground(torch.nn.Module):
    """A stand-in network that calls every pixel foreground (logits (N, 2, H, W))."""

    size_multiple, halo, receptive_field = 1, 0, 1

    def forward(self, x):
        background = torch.zeros_like(x[:, :1])
        return torch.cat([background, background + 5.0], dim=1)


@pytest.fixture(scope="module")
def ignore_db(shared_data, tmp_path_factory):
    """Three bbbc039 instance masks whose left quarter is unlabelled (ignore label 9999)."""
    root = tmp_path_factory.mktemp("ignore")
    src = shared_data / "bbbc039"
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for f in list_image_files(src / "images")[:3]:
        tifffile.imwrite(root / "images" / f"{stem_of(f)}.tif", read_image(f)[0])
        mask_file = next(p for p in list_image_files(src / "masks") if stem_of(p) == stem_of(f))
        mask = read_mask(mask_file).astype(np.uint16)
        mask[:, : mask.shape[1] // 4] = IGNORE
        tifffile.imwrite(root / "masks" / f"{stem_of(f)}.tif", mask)
    meta = {"mask_kind": "instance", "ignore_label": IGNORE}
    (root / "images" / "dataset.yaml").write_text(yaml.safe_dump(meta))
    split = {"train": [stem_of(p) for p in list_image_files(root / "images")][:2]}
    split["test"] = [stem_of(p) for p in list_image_files(root / "images")][2:]
    ingest(root / "images", root / "masks", root / "db", split=split, progress=False)
    return root


def test_target_takes_the_databases_ignore_label(ignore_db):
    db = ignore_db / "db"
    task = SegmentationTask(db / "train.lmdb", db / "test.lmdb", TrainConfig())
    assert task.target.ignore_label == IGNORE and task.target.rule == "semantic"
    assert task.target.class_names == ("background", "foreground")
    cfg = override(TrainConfig(), {"data.ignore_label": 7, "data.target": "boundary"})
    explicit = SegmentationTask(db / "train.lmdb", None, cfg).target
    assert explicit.ignore_label == 7 and explicit.num_classes == 3  # the config wins


def test_evaluation_skips_unlabelled_pixels(ignore_db):
    db = ignore_db / "db"
    cfg = override(TrainConfig(), {"data.test_tile_size": 256, "plot_test_images": 0})
    task = SegmentationTask(db / "train.lmdb", db / "test.lmdb", cfg)
    runtime = Runtime(distributed.DistInfo(0, 1, 0, torch.device("cpu")))
    ev = task.evaluate(AllForeground(), runtime)
    (stem,) = json.loads((db / "split.json").read_text())["test"]
    mask = read_mask(ignore_db / "masks" / f"{stem}.tif")
    valid = mask != IGNORE
    objects = (mask > 0) & valid
    # every labelled pixel is predicted foreground: IoU(fg) = object pixels / labelled pixels;
    # counting the unlabelled quarter as foreground would give a larger value
    assert ev.metrics["iou_foreground"] == pytest.approx(objects.sum() / valid.sum(), rel=1e-9)
    assert ev.metrics["iou_background"] == pytest.approx(0.0)
    wrong = ((mask > 0).sum()) / mask.size
    assert abs(ev.metrics["iou_foreground"] - wrong) > 0.05


def test_robust_extras_record_the_noise_floor_and_training_statistics(ignore_db):
    db = ignore_db / "db"
    cfg = override(TrainConfig(), {"data.normalization": "robust"})
    extras = SegmentationTask(db / "train.lmdb", None, cfg).checkpoint_extras()
    assert json.loads(json.dumps(extras)) == extras  # plain values for weights_only loading
    spec = extras["normalization"]
    assert spec["mode"] == "robust" and spec["floor_fraction"] == 0.25
    assert 50 < spec["training_snr"][0] < 400  # bbbc039 nuclei fields, in noise sigmas
    assert spec["noise_floor"] == [pytest.approx(0.25 * spec["training_snr"][0])]
    stats = extras["input_statistics"]
    assert stats["images"] == 2 and stats["statistics"]["p1"]["max"][0] == pytest.approx(
        0.0, abs=1e-3
    )

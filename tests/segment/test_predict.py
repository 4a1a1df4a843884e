"""Prediction from checkpoints on real images: TTA, files, instances, devices, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scarce.config import TrainConfig, config_to_dict
from scarce.data.normalize import normalize
from scarce.engine.checkpoint import load_model, save_checkpoint
from scarce.engine.distributed import resolve_device
from scarce.io import read_image, read_mask
from scarce.models import UNet
from scarce.segment.predict import instances_from_prediction, predict_files, predict_image
from scarce.segment.targets import TargetSpec
from tests.shared import SHARED_DATA

SPEC = {"mode": "zscore", "percentiles": [1, 99.8], "mean": None, "std": None}


def tiny_unet(in_channels: int = 1, num_classes: int = 2, seed: int = 0) -> UNet:
    """A width-4, depth-3 U-Net in eval mode: random weights, batch norm calibrated on data.

    A freshly initialised deep net in eval mode outputs nearly constant logits (std ~1e-3),
    which would make equality checks vacuous; running the batch-norm statistics over a real
    image (as training would) gives logits that vary by O(1) across the image.
    """
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    torch.manual_seed(seed)
    model = UNet(in_channels, num_classes, depth=3, width=4)
    image = read_image(SHARED_DATA / "isbi2012" / "images" / "05.png")[:, :256, :256]
    x = torch.from_numpy(normalize(np.repeat(image, in_channels, axis=0), SPEC))[None]
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration pass
            m.reset_running_stats()
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def write_checkpoint(path: Path, model: UNet, target: str = "semantic") -> Path:
    """A Scarce checkpoint for ``model`` as the trainer writes it (no training state)."""
    names = ["background", "interior", "boundary"] if target == "boundary" else None
    spec = TargetSpec(
        mask_kind="instance",
        rule=target,
        boundary_width=2,
        ignore_label=None,
        num_classes=model.num_classes,
        class_names=tuple(names or [f"class_{k}" for k in range(model.num_classes)]),
    )
    return save_checkpoint(
        path,
        {
            "task": "segment",
            "model": {"name": "unet", "arguments": model.arguments},
            "model_state": model.state_dict(),
            "config": config_to_dict(TrainConfig()),
            "extras": {"normalization": SPEC, "target": spec.to_dict()},
        },
    )


def test_channel_mismatch_is_an_error_that_names_both_counts(tmp_path, shared_data):
    ckpt_path = write_checkpoint(tmp_path / "m.pt", tiny_unet(in_channels=1))
    model, ckpt = load_model(ckpt_path)
    rgb = np.repeat(read_image(shared_data / "isbi2012" / "images" / "00.png"), 3, axis=0)
    with pytest.raises(ValueError, match=r"3 channel\(s\) but the model was trained on 1-ch"):
        predict_image(model, rgb, ckpt)
    # predict_files reports every bad image in one error, before writing anything
    folder = tmp_path / "imgs"
    folder.mkdir()
    import tifffile

    tifffile.imwrite(folder / "a.tif", np.moveaxis(rgb, 0, -1))
    tifffile.imwrite(folder / "b.tif", rgb[0])
    tifffile.imwrite(folder / "c.tif", np.moveaxis(rgb, 0, -1))
    (folder / "d.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"3 of 4 image\(s\)") as err:
        predict_files(ckpt_path, folder, tmp_path / "out", progress=False)
    assert "a.tif" in str(err.value) and "c.tif" in str(err.value)
    assert "d.png" in str(err.value) and "b.tif" not in str(err.value)
    assert not list((tmp_path / "out").iterdir())


def test_tta_is_equivariant_and_exact_for_a_pointwise_model(tmp_path, shared_data):
    image = read_image(shared_data / "isbi2012" / "images" / "03.png")[:, :96, :128]
    model, ckpt = load_model(write_checkpoint(tmp_path / "m.pt", tiny_unet(seed=1)))
    opts = dict(tile_size=64, overlap=0.5, tta=True)
    probs = predict_image(model, image, ckpt, **opts)
    assert probs.shape == (2, 96, 128)
    torch.testing.assert_close(probs.sum(0), torch.ones(96, 128))
    plain = predict_image(model, image, ckpt, **{**opts, "tta": False})
    assert (probs - plain).abs().max() > 1e-3  # TTA does change the result
    # averaging over the 8 dihedral transforms makes the prediction commute with them
    flipped = predict_image(model, np.ascontiguousarray(image[:, :, ::-1]), ckpt, **opts)
    torch.testing.assert_close(flipped, probs.flip(-1), atol=1e-5, rtol=0)
    turned = predict_image(model, np.ascontiguousarray(np.rot90(image, 1, (1, 2))), ckpt, **opts)
    torch.testing.assert_close(turned, torch.rot90(probs, 1, (1, 2)), atol=1e-5, rtol=0)
    # a 1x1 convolution commutes with every transform: TTA must equal plain prediction
    pointwise = torch.nn.Conv2d(1, 2, 1).eval()
    tta = predict_image(pointwise, image, ckpt, **opts)
    torch.testing.assert_close(tta, predict_image(pointwise, image, ckpt, **{**opts, "tta": False}))


def _discs(shape=(64, 96), centres=((32, 30), (32, 52)), radius=12, ring=2):
    """Class map 0 background / 1 interior / 2 boundary ring of touching discs, + truths."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    classes = np.zeros(shape, np.int64)
    truths = []
    for cy, cx in centres:
        d = np.hypot(yy - cy, xx - cx)
        truths.append(d <= radius)
        classes[(d <= radius) & (classes == 0)] = 2
    for cy, cx in centres:
        classes[np.hypot(yy - cy, xx - cx) < radius - ring] = 1
    return classes, truths


def test_watershed_splits_touching_discs_and_drops_small_objects():
    classes, truths = _discs()
    classes[5:8, 85:88] = 1  # a 9-pixel speck: removed at min_object_size 16
    rng = np.random.default_rng(0)
    probs = np.full((3, *classes.shape), 0.1, np.float32)
    np.put_along_axis(probs, classes[None], 0.8, axis=0)
    probs += rng.uniform(0, 0.05, probs.shape).astype(np.float32)
    labels = instances_from_prediction(probs, "boundary", min_object_size=16)
    assert labels.dtype == np.int32 and labels.shape == classes.shape
    assert sorted(np.unique(labels)) == [0, 1, 2]
    assert labels[5:8, 85:88].max() == 0
    for truth in truths:  # each disc is one object, IoU > 0.85 with its true disc
        ids, counts = np.unique(labels[truth], return_counts=True)
        best = ids[np.argmax(counts)]
        iou = (truth & (labels == best)).sum() / (truth | (labels == best)).sum()
        assert best > 0 and iou > 0.85
    # the same foreground as a 2-class prediction is one merged component
    fg = np.stack([probs[0], probs[1] + probs[2]])
    merged = instances_from_prediction(fg, "semantic", min_object_size=16)
    assert merged.max() == 1
    assert instances_from_prediction(fg, "semantic", min_object_size=0).max() == 2
    with pytest.raises(ValueError, match="3 classes"):
        instances_from_prediction(fg, "boundary")


def test_unsure_objects_are_dropped_by_their_mean_foreground_probability():
    classes, truths = _discs()
    rng = np.random.default_rng(1)
    probs = np.full((3, *classes.shape), 0.1, np.float32)
    np.put_along_axis(probs, classes[None], 0.8, axis=0)
    probs += rng.uniform(0, 0.05, probs.shape).astype(np.float32)
    # the network is unsure of the second disc: its class wins the argmax by a small margin
    unsure = truths[1] & ~truths[0]
    probs[:, unsure] = np.where(probs[:, unsure] > 0.5, 0.45, 0.3)
    probs[0, unsure] = 0.4  # mean foreground probability there: 1 - 0.4 = 0.6
    every = instances_from_prediction(probs, "boundary")
    kept = instances_from_prediction(probs, "boundary", min_object_score=0.85)
    assert every.max() == 2 and kept.max() == 1
    assert kept[truths[0] & ~truths[1]].min() == 1 and kept[unsure].max() == 0
    # a score at or under every object's keeps the same objects, sizes and scores combine
    assert np.array_equal(instances_from_prediction(probs, "boundary", min_object_score=0.5), every)
    both = instances_from_prediction(probs, "boundary", min_object_size=10**6, min_object_score=0.5)
    assert both.max() == 0
    with pytest.raises(ValueError, match="min_object_score"):
        instances_from_prediction(probs, "boundary", min_object_score=1.5)


def test_predict_files_on_isbi2012_writes_maps_probabilities_instances(tmp_path, shared_data):
    ckpt_path = write_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", tiny_unet())
    images = tmp_path / "images"
    images.mkdir()
    for name in ("00.png", "01.png", "02.png"):
        (images / name).symlink_to(shared_data / "isbi2012" / "images" / name)
    out = tmp_path / "pred" / "nested"
    rows = predict_files(
        tmp_path / "run",
        images,
        out,
        probabilities=True,
        instances=True,
        tile_size=256,
        overlap=0.5,
        device="cpu",
        progress=False,
    )
    assert [Path(r["class_map"]).name for r in rows] == ["00.tif", "01.tif", "02.tif"]
    for row in rows:
        classes = read_mask(row["class_map"])
        assert classes.shape == (512, 512) and classes.dtype == np.uint8
        assert set(np.unique(classes)) <= {0, 1}
        probs = read_image(row["probabilities"], channel_axis=0)
        assert probs.shape == (2, 512, 512) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
        np.testing.assert_array_equal(probs.argmax(0), classes)
        inst = read_mask(row["instances"])
        assert inst.shape == (512, 512) and not (inst > 0)[classes == 0].any()
        # the rows are plain JSON values (paths as str, shape as a list), as the CLI prints them
        assert json.loads(json.dumps(row)) == {**row, "shape": list(row["shape"])}
    png = predict_files(
        ckpt_path, images / "01.png", tmp_path / "png", fmt="png", tile_size=256, progress=False
    )
    assert Path(png[0]["class_map"]).name == "01.png"
    np.testing.assert_array_equal(read_mask(png[0]["class_map"]), read_mask(rows[1]["class_map"]))


def test_predict_files_refuses_bad_arguments_before_work(tmp_path, shared_data):
    ckpt_path = write_checkpoint(tmp_path / "m.pt", tiny_unet())
    image = shared_data / "isbi2012" / "images" / "00.png"
    with pytest.raises(FileNotFoundError, match="no such image"):
        predict_files(ckpt_path, tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="unsupported image format '.pt'"):
        predict_files(ckpt_path, ckpt_path, tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot create output folder"):
        predict_files(ckpt_path, image, tmp_path / "file" / "out")
    with pytest.raises(ValueError, match="fmt must be"):
        predict_files(ckpt_path, image, tmp_path / "out", fmt="jpg")
    assert not (tmp_path / "out").exists()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


_BIG = """
import json, resource, sys, time, numpy as np, tifffile
from scarce.io import read_image
from scarce.segment.predict import predict_files
tile = read_image(sys.argv[1])[0]
tifffile.imwrite(sys.argv[2] + "/big.tif", np.tile(tile, (8, 8)))
start = time.perf_counter()
rows = predict_files(sys.argv[3], sys.argv[2] + "/big.tif", sys.argv[4], probabilities=True,
                     instances=True, progress=False)
print(json.dumps({"shape": rows[0]["shape"], "seconds": time.perf_counter() - start,
                  "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.mark.slow
def test_4096x4096_image_predicts_within_memory(tmp_path, shared_data):
    """Peak RSS of a fresh process predicting a 4096x4096 image (16.8 Mpx) with a tiny U-Net."""
    ckpt_path = write_checkpoint(tmp_path / "m.pt", tiny_unet())
    (tmp_path / "in").mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _BIG,
            str(shared_data / "isbi2012" / "images" / "00.png"),
            str(tmp_path / "in"),
            str(ckpt_path),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(result.stdout.splitlines()[-1])
    print(f"4096x4096: {info['seconds']:.1f} s, peak RSS {info['peak_kib'] / 2**20:.2f} GiB")
    assert info["shape"] == [4096, 4096]
    assert info["peak_kib"] < 4 * 2**20  # KiB: far below the 24 GB of this machine
    assert read_mask(tmp_path / "out" / "big.tif").shape == (4096, 4096)

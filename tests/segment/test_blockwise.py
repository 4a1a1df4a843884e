"""Block-wise prediction on Dask equals whole-image prediction; objects cut by blocks get one id."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from scarce.data.normalize import MAX_STAT_PIXELS
from scarce.engine.checkpoint import load_model
from scarce.io import list_image_files, read_image, read_mask
from scarce.segment import blockwise, stitch
from scarce.segment.predict import instances_from_prediction, predict_image
from scarce.segment.targets import instances_to_target
from tests.segment.test_predict import tiny_unet, write_checkpoint

da = pytest.importorskip("dask.array")
pytest.importorskip("dask_image")


def isbi_mosaic(shared_data, height: int, width: int) -> np.ndarray:
    """isbi2012 sections 00-03 as a 2 x 2 mosaic, cropped to ``(1, height, width)`` uint8."""
    sections = [read_image(shared_data / "isbi2012" / "images" / f"{i:02d}.png") for i in range(4)]
    rows = [np.concatenate(sections[i : i + 2], axis=2) for i in (0, 2)]
    return np.ascontiguousarray(np.concatenate(rows, axis=1)[:, :height, :width])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("bw") / "m.pt", tiny_unet(seed=1))


@pytest.mark.parametrize(("size", "chunk"), [((1000, 900), 256), ((700, 650), 300)])
def test_blockwise_probabilities_equal_whole_image_prediction(shared_data, checkpoint, size, chunk):
    model, ckpt = load_model(checkpoint)
    image = isbi_mosaic(shared_data, *size)
    whole = predict_image(model, image, ckpt, tile_size=256, overlap=0.5).numpy()
    lazy = da.from_array(image, chunks=(1, 333, 333))  # file chunks need not match blocks
    probs = blockwise.probabilities(
        checkpoint, lazy, tile_size=256, overlap=0.5, blend="gaussian", batch_size=4, chunk=chunk
    )
    assert len(probs.chunks[1]) >= 2 and len(probs.chunks[2]) >= 2  # several blocks each way
    with blockwise.dask_client():
        got = probs.compute()
    assert got.shape == whole.shape and got.dtype == np.float32
    assert np.abs(got - whole).max() < 1e-5
    assert np.array_equal(got.argmax(0), whole.argmax(0))
    assert np.array_equal(blockwise.class_map(probs).compute(), whole.argmax(0))


@pytest.mark.parametrize(
    "spec",
    [
        {"mode": "percentile", "percentiles": [1.0, 99.8], "mean": None, "std": None},
        # the noise floor binds (scale = floor x the image's noise): the noise must be the
        # whole image's, not the strided sample's
        {"mode": "robust", "percentiles": [1.0, 99.8], "noise_floor": [500.0]},
    ],
    ids=["percentile", "robust"],
)
def test_statistics_are_computed_once_for_the_whole_image_as_predict_image_does(shared_data, spec):
    image = np.tile(isbi_mosaic(shared_data, 1024, 1024), (1, 3, 2))  # > MAX_STAT_PIXELS
    assert image.shape[1] * image.shape[2] > MAX_STAT_PIXELS
    from scarce.data.normalize import noise_sigma, normalization_params

    if spec["mode"] == "robust":  # the floor is what sets the scale
        lo, hi = np.percentile(image[:, ::2, ::2], spec["percentiles"])
        assert 500.0 * noise_sigma(image)[0] > hi - lo

    expected = normalization_params(image, spec)
    got = blockwise.image_statistics(da.from_array(image, chunks=(1, 500, 500)), spec)
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])


def test_axis_chunks_merge_a_short_tail_and_stay_on_the_grid():
    assert blockwise.axis_chunks(1000, 256, 256, 8) == (256, 256, 488)
    assert blockwise.axis_chunks(1100, 250, 256, 16) == (256, 256, 256, 332)
    assert blockwise.axis_chunks(100, 256, 256, 8) == (100,)
    assert sum(blockwise.axis_chunks(20_000, 2048, 512, 16)) == 20_000


def bbbc_mosaic(shared_data) -> np.ndarray:
    """Four bbbc039 nucleus instance masks as one 1040 x 1392 label image (unique ids)."""
    files = list_image_files(shared_data / "bbbc039" / "masks")[:4]
    masks = [read_mask(f).astype(np.int64) for f in files]
    for i in range(1, 4):
        masks[i] = np.where(masks[i] > 0, masks[i] + 10_000 * i, 0)
    return np.block([[masks[0], masks[1]], [masks[2], masks[3]]])


def same_objects(a: np.ndarray, b: np.ndarray) -> bool:
    """True if two label images hold the same objects (ids may differ: a 1:1 mapping)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@pytest.mark.parametrize(
    ("rule", "score"), [("boundary", 0.0), ("semantic", 0.0), ("boundary", 0.9)]
)
def test_nuclei_cut_by_block_borders_are_counted_once(shared_data, rule, score):
    truth = bbbc_mosaic(shared_data)
    target = instances_to_target(truth, "boundary", 2)
    # smooth like a network's output: on exact plateaus the watershed breaks ties by scan
    # order, which differs between a block and the whole image
    probs = np.stack([ndi.gaussian_filter((target == k).astype(np.float32), 1.0) for k in range(3)])
    probs /= probs.sum(axis=0)
    whole = instances_from_prediction(probs, rule, min_object_size=10, min_object_score=score)
    if score:  # the score drops some objects (small ones: smoothing lowers their mean)
        assert whole.max() < instances_from_prediction(probs, rule, min_object_size=10).max()
    classes = da.from_array(probs.argmax(0).astype(np.uint8), chunks=200)
    labels, count = stitch.instances(
        classes,
        da.from_array(probs[1], chunks=200),
        rule,
        min_object_size=10,
        depth=64,
        foreground=da.from_array(1.0 - probs[0], chunks=200),
        min_object_score=score,
    )
    got = labels.compute()
    # plenty of nuclei cross the 200-px block borders ...
    crossing = {int(v) for v in np.unique(whole[199:201, :]) if v} | {
        int(v) for v in np.unique(whole[:, 399:401]) if v
    }
    assert len(crossing) > 10
    # ... and each still is one object, the same objects as whole-image instances
    assert count == whole.max() == got.max() and got.dtype == np.uint32
    assert same_objects(got, whole)
    assert np.array_equal(np.unique(got), np.arange(count + 1))

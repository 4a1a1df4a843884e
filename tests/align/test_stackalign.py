"""Whole-stack alignment: defect masks in training, voting, skipping, parallel pairwise fields."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from scarce.align.apply import align_stack, neighbours
from scarce.align.defects import crack, fold
from scarce.align.pairs import FineTune, normalise, pairwise_fields
from scarce.align.readers import make_pair_loader
from scarce.align.stack import ingest_stack
from scarce.align.task import align_train
from scarce.io import read_image
from tests.align.test_task import tiny


@pytest.fixture(scope="module")
def damaged(shared_data, tmp_path_factory):
    """Eight 128 x 128 ISBI sections; slice 3 cracked, slice 5 folded, with their masks."""
    root = tmp_path_factory.mktemp("damaged")
    folder = shared_data / "isbi2012" / "unlabeled"
    slices = np.stack([read_image(folder / f"{z:02d}.png")[0, 64:192, 64:192] for z in range(8)])
    slices = slices.astype(np.float32)
    masks = np.zeros(slices.shape, np.uint8)
    rng = np.random.default_rng(0)
    for z, make in ((3, crack), (5, fold)):
        d = make(slices[z], rng)
        slices[z], masks[z] = d.image, d.mask
    tifffile.imwrite(root / "stack.tif", slices, photometric="minisblack")
    tifffile.imwrite(root / "masks.tif", masks, photometric="minisblack")
    ingest_stack(root / "stack.tif", root / "db", test_slices="6:8", masks=root / "masks.tif")
    return root


@pytest.fixture(scope="module")
def model(damaged, tmp_path_factory):
    """A tiny aligner trained with the defect masks and the consensus penalty."""
    run = tmp_path_factory.mktemp("run") / "run"
    cfg = tiny(max_steps=20, **{"loss.lambda_consensus": 0.5})
    summary = align_train(damaged / "db" / "train.lmdb", damaged / "db" / "test.lmdb", run, cfg)
    assert np.isfinite(summary["last_eval"]["train_loss"])
    return run


def test_batches_carry_the_defect_masks(damaged):
    cfg = tiny(**{"data.batch_size": 8})
    with make_pair_loader(damaged / "db" / "train.lmdb", cfg) as batches:
        masks = torch.cat([next(batches)["source_mask"] for _ in range(4)])
    values = set(torch.unique(masks).tolist())
    assert values <= {0.0, 1.0, 2.0} and len(values) > 1  # cracks and folds reach the loss


def test_parallel_pairwise_fields_equal_the_sequential_ones(damaged, model):
    stack = tifffile.imread(damaged / "stack.tif")
    norm = [normalise(s, np.ones(s.shape, bool)) for s in stack]
    ones = np.ones(stack[0].shape, bool)
    jobs = {
        (z, z - 1): {
            "source": norm[z],
            "target": norm[z - 1],
            "valid_s": ones,
            "valid_t": ones,
            "mask_s": None,
            "mask_t": None,
        }
        for z in range(1, 5)
    }
    settings = FineTune(steps=3)
    one = pairwise_fields(model, jobs, settings=settings, workers=1)
    two = pairwise_fields(model, jobs, settings=settings, workers=2)
    assert set(one) == set(two) == set(jobs)
    for key in jobs:
        torch.testing.assert_close(one[key][0], two[key][0], rtol=0, atol=1e-6)


def test_neighbours_skip_bad_slices():
    near = neighbours(6, 0, 3, skipped={2})
    assert near[1] == [0] and near[3] == [1, 0] and near[4] == [3, 1, 0] and near[5] == [4, 3, 1]
    assert neighbours(4, 2, 1, set()) == {0: [1], 1: [2], 3: [2]}


def test_align_with_vote_masks_and_a_blank_slice(damaged, model, tmp_path):
    stack = tifffile.imread(damaged / "stack.tif")
    stack[4] = 0.0  # a blank section: all missing data
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    masks = tifffile.imread(damaged / "masks.tif")
    report = align_stack(
        model,
        tmp_path / "s.tif",
        tmp_path / "out",
        vote=3,
        missing_value=0.0,
        masks=masks,
        workers=1,
        progress=False,
    )
    assert report["skipped"] == [4]
    rows = {r["z"]: r for r in report["pairs"]}
    assert rows[5]["neighbours"] == [3, 2, 1]  # the blank slice is never a neighbour
    assert rows[4]["skipped"] and not rows[5]["skipped"]
    assert {"disagreement_px", "cpc_after", "cpc_before", "seconds"} <= set(rows[5])
    assert (tmp_path / "out" / "qc" / "disagreement_z0005.tif").is_file()
    fields = tifffile.imread(tmp_path / "out" / "fields.tif")
    assert fields.shape == (8, 2, 128, 128) and np.isfinite(fields).all()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["vote"] == 3


def test_defects_train_builds_data_and_a_four_class_model(damaged, tmp_path, capsys):
    from scarce.cli import main
    from scarce.engine.checkpoint import load_checkpoint
    from scarce.segment.task import target_of

    small = tifffile.imread(damaged / "stack.tif")[:3]
    tifffile.imwrite(tmp_path / "three.tif", small, photometric="minisblack")
    argv = [
        "defects-train",
        "--stack",
        str(tmp_path / "three.tif"),
        "--out",
        str(tmp_path / "det"),
        "--per-slice",
        "2",
        "--set",
        "max_steps=2",
        "--set",
        "test_every_n_steps=2",
        "--set",
        "data.patch_size=64",
        "--set",
        "data.reader_count=0",
        "--set",
        "model.width=4",
        "--set",
        "model.depth=2",
        "--set",
        "amp=off",
    ]
    assert main(argv) == 0
    masks = sorted((tmp_path / "det_data" / "masks").glob("*.tif"))
    assert len(masks) == 9  # 3 slices x (1 clean + 2 damaged)
    values = set(np.unique(np.concatenate([tifffile.imread(m).ravel() for m in masks])).tolist())
    assert {0} < values <= {0, 1, 2, 3}
    target = target_of(load_checkpoint(tmp_path / "det"))
    assert target.class_names == ("normal", "crack", "fold", "missing")

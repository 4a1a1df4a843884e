"""The alignment task on the engine: it learns, resumes exactly, and notices a collapse."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from scarce.align.config import AlignConfig
from scarce.align.evaluate import composition_error, random_deformation
from scarce.align.stack import ingest_stack
from scarce.align.task import align_train
from scarce.cli import main
from scarce.config import load_config, override
from scarce.engine.checkpoint import load_checkpoint, load_model
from scarce.io import read_image
from scarce.models.field import warp

TINY = {
    "data.patch_size": 64,
    "data.batch_size": 2,
    "data.reader_count": 0,
    "data.test_size": 96,
    "data.test_deformations": 1,
    "data.test_amplitude": 6.0,
    "model.levels": 3,
    "model.encoder_widths": [8, 8, 8],
    "model.aligner_widths": [8, 8],
    "model.kernel_size": 3,
    "model.finest_level": 0,
    "model.correlation_radius": 2,
    "model.smoothing": 4.0,
    "augment.translation": 3.0,
    "stage.stage_steps": 10,
    "optim.learning_rate": 0.003,
    "optim.warmup_steps": 0,
    "optim.schedule": "constant",
    "test_every_n_steps": 10,
    "early_stopping": 0,
    "max_steps": 30,
    "log_every_n_steps": 10,
    "plot_test_images": 1,
    "amp": "off",
}


def tiny(**extra) -> AlignConfig:
    """An aligner that trains in a few seconds on 2 CPU cores."""
    return override(AlignConfig(), {**TINY, **extra})


@pytest.fixture(scope="module")
def stack_db(shared_data, tmp_path_factory):
    """Eight real ISBI 2012 sections (128 x 128 crops); slices 6-7 are the test pair."""
    root = tmp_path_factory.mktemp("stack")
    folder = shared_data / "isbi2012" / "unlabeled"
    slices = np.stack([read_image(folder / f"{z:02d}.png")[0, 64:192, 64:192] for z in range(8)])
    tifffile.imwrite(root / "stack.tif", slices, photometric="minisblack")
    ingest_stack(root / "stack.tif", root / "db", test_slices="6:8")
    return root


def test_preset_loads_and_is_consistent():
    cfg = load_config("align-em", AlignConfig)
    assert cfg.data.patch_size % 2 ** (cfg.model.levels - 1) == 0
    assert cfg.max_steps >= cfg.stage.stage_steps * (cfg.model.levels - cfg.model.finest_level)


def test_tiny_aligner_learns_known_shifts_and_beats_identity(stack_db, tmp_path):
    summary = align_train(
        stack_db / "db" / "train.lmdb",
        stack_db / "db" / "test.lmdb",
        tmp_path / "run",
        tiny(max_steps=60, **{"stage.stage_steps": 20}),
    )
    assert summary["task"] == "align" and summary["steps"] == 60
    net, ckpt = load_model(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["task"] == "align" and net.open_levels == 3
    image = tifffile.imread(stack_db / "stack.tif")[7].astype(np.float32)
    t = torch.from_numpy((image - image.mean()) / image.std())[None, None]
    errors, identity = [], []
    for seed in range(4):
        u = random_deformation((128, 128), 5.0, np.random.default_rng(seed))
        with torch.no_grad():
            d = net.field(warp(t, u), t)
        errors.append(float(composition_error(d, u)[0, 12:-12, 12:-12].mean()))
        identity.append(float(u[0].norm(dim=0)[12:-12, 12:-12].mean()))
    assert np.mean(errors) < 0.7 * np.mean(identity), (errors, identity)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,time_s,train_loss,test_loss,similarity") and len(rows) == 7
    assert (tmp_path / "run" / "plots" / "step_00060.png").is_file()


def test_resume_equals_an_uninterrupted_run(stack_db, tmp_path):
    db = stack_db / "db"
    align_train(db / "train.lmdb", db / "test.lmdb", tmp_path / "full", tiny(max_steps=30))
    align_train(db / "train.lmdb", db / "test.lmdb", tmp_path / "half", tiny(max_steps=20))
    align_train(
        db / "train.lmdb", db / "test.lmdb", tmp_path / "half", tiny(max_steps=30), resume=True
    )
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model_state"]
    b = load_checkpoint(tmp_path / "half" / "checkpoints" / "last.pt")["model_state"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_collapse_is_detected_and_ends_the_run(stack_db, tmp_path, caplog):
    # no cost volume and a learning rate of 0: the field stays the identity
    cfg = tiny(
        max_steps=200,
        **{"model.correlation_radius": 0, "optim.learning_rate": 0.0, "stage.collapse_patience": 2},
    )
    summary = align_train(
        stack_db / "db" / "train.lmdb", stack_db / "db" / "test.lmdb", tmp_path / "run", cfg
    )
    assert summary["stop_reason"] == "collapse" and summary["steps"] == 20
    assert "collapsed to the identity" in caplog.text and "lambda_smooth" in caplog.text


def test_align_cli_writes_the_documented_files(stack_db, tmp_path, capsys):
    db = stack_db / "db"
    align_train(db / "train.lmdb", db / "test.lmdb", tmp_path / "run", tiny(max_steps=10))
    three = tifffile.imread(stack_db / "stack.tif")[:3]
    tifffile.imwrite(tmp_path / "three.tif", three, photometric="minisblack")
    out = tmp_path / "out"
    assert (
        main(
            [
                "align",
                "--model",
                str(tmp_path / "run"),
                "--stack",
                str(tmp_path / "three.tif"),
                "--out",
                str(out),
                "--reference",
                "1",
                "--fine-tune-steps",
                "3",
            ]
        )
        == 0
    )
    aligned, fields = tifffile.imread(out / "aligned.tif"), tifffile.imread(out / "fields.tif")
    assert aligned.shape == (3, 128, 128) and aligned.dtype == np.uint8
    assert fields.shape == (3, 2, 128, 128) and fields.dtype == np.float32
    np.testing.assert_array_equal(aligned[1], three[1])  # the reference stays put
    assert not fields[1].any()
    report = json.loads((out / "report.json").read_text())
    assert [(r["z"], r["target_z"]) for r in report["pairs"]] == [(0, 1), (2, 1)]
    assert all(
        {"seconds", "cpc_before", "cpc_after", "fold_fraction"} <= set(r) for r in report["pairs"]
    )
    tifffile.imwrite(tmp_path / "truth.tif", np.zeros_like(fields), photometric="minisblack")
    assert (
        main(
            [
                "align-evaluate",
                "--stack",
                str(out / "aligned.tif"),
                "--fields",
                str(out / "fields.tif"),
                "--truth-fields",
                str(tmp_path / "truth.tif"),
                "--before",
                str(tmp_path / "three.tif"),
                "--chunk",
                "32",
                "--out",
                str(tmp_path / "report"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    mean_field = float(np.linalg.norm(fields, axis=1).mean())  # truth 0: the error is |D|
    assert metrics["composition_error"]["mean_px"] == pytest.approx(mean_field, rel=1e-3)
    assert {"mean", "variance", "p1", "p5", "p95", "p99"} <= set(metrics["cpc"])
    assert (tmp_path / "report" / "pair_0001.png").is_file()
    capsys.readouterr()
    assert main(["history", str(tmp_path / "run"), "--lineage"]) == 0
    assert "trained from scratch" in capsys.readouterr().out


def test_lineage_follows_init_from(stack_db, tmp_path, capsys):
    db = stack_db / "db"
    align_train(db / "train.lmdb", db / "test.lmdb", tmp_path / "a", tiny(max_steps=10))
    align_train(
        db / "train.lmdb",
        db / "test.lmdb",
        tmp_path / "b",
        tiny(max_steps=10, **{"loss.lambda_smooth": 0.5}),
        init_from=tmp_path / "a",
    )
    assert main(["history", str(tmp_path / "b"), "--lineage"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and str(tmp_path / "b") in out[0] and "lambda_smooth=0.5" in out[0]
    assert out[1].startswith("  <- ") and "trained from scratch" in out[1]


def test_a_full_disk_while_aligning_leaves_no_output_half_written(stack_db, tmp_path, monkeypatch):
    import errno
    import os

    from scarce.align.apply import align_stack
    from scarce.errors import WriteError

    db = stack_db / "db"
    align_train(db / "train.lmdb", db / "test.lmdb", tmp_path / "run", tiny(max_steps=2))
    out = tmp_path / "out"
    real = tifffile.imwrite

    def imwrite(path, data, **kw):
        if "fields" in str(path):  # aligned.tif is written, then the disk fills up
            with open(path, "wb") as fh:
                fh.write(b"II*\x00" + bytes(64))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data, **kw)

    monkeypatch.setattr(tifffile, "imwrite", imwrite)
    with pytest.raises(WriteError, match=r"fields\.tif: no space left on device"):
        align_stack(tmp_path / "run", stack_db / "stack.tif", out, progress=False)
    monkeypatch.undo()
    # the QC maps and aligned.tif are complete, fields.tif absent, no temporary file anywhere
    assert sorted(p.name for p in out.iterdir()) == ["aligned.tif", "qc"]
    assert not [p for p in out.rglob(".*")]
    for qc in (out / "qc").iterdir():
        assert tifffile.imread(qc).ndim == 2  # whole files (maps per block)
    assert tifffile.imread(out / "aligned.tif").shape == (8, 128, 128)

"""CLI and run history: the verbs a user types, on real data."""

from __future__ import annotations

import json

import pytest
import torch

from scarce.cli import main
from scarce.engine.history import collect_runs, config_diff, format_history


def test_ingest_inspect_train_history_predict_evaluate(nist_db, tmp_path, capsys, shared_data):
    db = nist_db
    common = [
        "--train-db",
        str(db / "train.lmdb"),
        "--max-steps",
        "4",
        "--test-every-n-steps",
        "2",
        "--patch-size",
        "64",
        "--batch-size",
        "2",
        "--reader-count",
        "0",
        "--set",
        "model.width=4",
        "--set",
        "model.depth=2",
    ]
    assert main(["train", *common, "--out", str(tmp_path / "runs" / "a")]) == 0
    assert (
        main(["train", *common, "--out", str(tmp_path / "runs" / "b"), "--learning-rate", "0.01"])
        == 0
    )
    # an existing run folder is refused with a clear message and exit code 2
    assert main(["train", *common, "--out", str(tmp_path / "runs" / "a")]) == 2
    assert "--resume" in capsys.readouterr().err

    runs = collect_runs([tmp_path / "runs"])
    assert [r["steps"] for r in runs] == [4, 4]
    assert all(r["stop_reason"] == "max_steps" for r in runs)
    assert "max_steps" in format_history(runs)
    assert config_diff(runs) == {"optim.learning_rate": [0.0003, 0.01]}
    assert main(["history", str(tmp_path / "runs"), "--diff"]) == 0
    out = capsys.readouterr().out
    assert "optim.learning_rate" in out and "best test loss" in out

    assert main(["inspect", str(db), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert json.dumps(info)  # serialisable

    images = shared_data / "nist_rpe" / "images"
    test_stems = json.loads((db / "split.json").read_text())["test"]
    one = next(p for p in images.iterdir() if p.stem == test_stems[0])
    assert (
        main(
            [
                "predict",
                "--model",
                str(tmp_path / "runs" / "a"),
                "--images",
                str(one),
                "--out",
                str(tmp_path / "pred"),
            ]
        )
        == 0
    )
    truth = tmp_path / "truth"
    truth.mkdir()
    (truth / f"{one.stem}.tif").symlink_to(shared_data / "nist_rpe" / "masks" / one.name)
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(tmp_path / "pred"),
                "--truth",
                str(truth),
                "--out",
                str(tmp_path / "report"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert 0.0 <= metrics["pixel_accuracy"] <= 1.0


def test_demo_without_data_says_what_to_pass(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "--data DIR" in capsys.readouterr().err


def test_ingest_bad_input_exits_nonzero_and_names_files(tmp_path, capsys):
    import numpy as np
    import tifffile

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", np.zeros((32, 32), np.uint16))
    tifffile.imwrite(tmp_path / "masks" / "a.tif", np.zeros((16, 32), np.uint8))
    tifffile.imwrite(tmp_path / "images" / "b.tif", np.zeros((32, 32), np.uint16))
    code = main(
        [
            "ingest",
            "--images",
            str(tmp_path / "images"),
            "--masks",
            str(tmp_path / "masks"),
            "--out",
            str(tmp_path / "db"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "a.tif" in err and "b.tif" in err
    assert not (tmp_path / "db").exists()


def _write_split(path, train, test):
    path.write_text(json.dumps({"train": train, "test": test}))
    return str(path)


def test_cli_isbi2012_slices_and_bbbc039_instances(shared_data, tmp_path):
    """ingest -> train -> predict -> evaluate from the CLI on isbi2012 (train on slices 00-23,
    test on 24-29) and on bbbc039 (instance masks, boundary target, object metrics)."""
    isbi = shared_data / "isbi2012"
    split = _write_split(
        tmp_path / "isbi_split.json",
        [f"{i:02d}" for i in range(24)],
        [f"{i:02d}" for i in range(24, 30)],
    )
    tiny = [
        "--max-steps",
        "2",
        "--test-every-n-steps",
        "2",
        "--patch-size",
        "64",
        "--batch-size",
        "2",
        "--reader-count",
        "0",
        "--set",
        "model.width=4",
        "--set",
        "model.depth=2",
        "--set",
        "data.test_tile_size=512",
    ]
    assert (
        main(
            [
                "ingest",
                "--images",
                str(isbi / "images"),
                "--masks",
                str(isbi / "masks"),
                "--out",
                str(tmp_path / "isbi_db"),
                "--split",
                split,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--train-db",
                str(tmp_path / "isbi_db" / "train.lmdb"),
                "--out",
                str(tmp_path / "isbi_run"),
                *tiny,
            ]
        )
        == 0
    )
    test_images = tmp_path / "isbi_test"
    test_images.mkdir()
    for i in range(24, 30):
        (test_images / f"{i:02d}.png").symlink_to(isbi / "images" / f"{i:02d}.png")
    assert (
        main(
            [
                "predict",
                "--model",
                str(tmp_path / "isbi_run"),
                "--images",
                str(test_images),
                "--out",
                str(tmp_path / "isbi_pred"),
            ]
        )
        == 0
    )
    truth = tmp_path / "isbi_truth"
    truth.mkdir()
    for i in range(24, 30):
        (truth / f"{i:02d}.png").symlink_to(isbi / "masks" / f"{i:02d}.png")
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(tmp_path / "isbi_pred"),
                "--truth",
                str(truth),
                "--out",
                str(tmp_path / "isbi_report"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "isbi_report" / "metrics.json").read_text())
    assert metrics["num_images"] == 6 and 0.0 <= metrics["rand_error"] <= 1.0

    bbbc = shared_data / "bbbc039"
    stems = sorted(p.stem for p in (bbbc / "images").iterdir())[:4]
    data = tmp_path / "bbbc"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
        for s in stems:
            (data / sub / f"{s}.png").symlink_to(bbbc / sub / f"{s}.png")
    split = _write_split(tmp_path / "bbbc_split.json", stems[:3], stems[3:])
    assert (
        main(
            [
                "ingest",
                "--images",
                str(data / "images"),
                "--masks",
                str(data / "masks"),
                "--out",
                str(tmp_path / "bbbc_db"),
                "--split",
                split,
                "--mask-kind",
                "instance",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--train-db",
                str(tmp_path / "bbbc_db" / "train.lmdb"),
                "--out",
                str(tmp_path / "bbbc_run"),
                *tiny,
                "--set",
                "data.target=boundary",
            ]
        )
        == 0
    )
    one = data / "images" / f"{stems[3]}.png"
    assert (
        main(
            [
                "predict",
                "--model",
                str(tmp_path / "bbbc_run"),
                "--images",
                str(one),
                "--out",
                str(tmp_path / "bbbc_pred"),
                "--instances",
            ]
        )
        == 0
    )
    assert (tmp_path / "bbbc_pred" / f"{stems[3]}_instances.tif").is_file()
    truth = tmp_path / "bbbc_truth"
    truth.mkdir()
    (truth / f"{stems[3]}.png").symlink_to(bbbc / "masks" / f"{stems[3]}.png")
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(tmp_path / "bbbc_pred"),
                "--truth",
                str(truth),
                "--instances",
                "--out",
                str(tmp_path / "bbbc_report"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "bbbc_report" / "metrics.json").read_text())
    assert set(metrics["objects"]["0.50"]) >= {"tp", "fp", "fn", "precision", "recall", "f1", "ap"}
    assert metrics["objects"]["0.50"]["tp"] + metrics["objects"]["0.50"]["fn"] > 50  # nuclei


def test_user_errors_print_one_line_and_exit_2(nist_db, tmp_path, capsys):
    train = ["train", "--train-db", str(nist_db / "train.lmdb"), "--out", str(tmp_path / "r")]
    cases = [
        (train + ["--config", "no-such-preset"], "neither a file nor a preset; presets: "),
        (train + ["--set", "model.nope=1"], "unknown config key 'model.nope'"),
        (
            [
                "predict",
                "--model",
                str(tmp_path),
                "--images",
                str(tmp_path / "x"),
                "--out",
                str(tmp_path / "o"),
            ],
            "no such image file or folder",
        ),
        (["inspect", str(tmp_path)], "no train.lmdb/test.lmdb"),
    ]
    if not torch.cuda.is_available():
        cases.append((train + ["--device", "cuda"], "CUDA is not available"))
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"scarce {argv[0]}: error:") and expected in err, err
        assert "\n" not in err and "Traceback" not in err, err


def test_a_bug_keeps_its_traceback(monkeypatch):
    from scarce import cli

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "history", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["history", "."])

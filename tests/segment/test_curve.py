"""scarce learning-curve: nested seeded subsets, subset databases, the curve and its verdict."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from scarce.config import override
from scarce.data.store import SampleStore, read_metadata
from scarce.data.subset import subset_database
from scarce.errors import InputError
from scarce.segment.curve import learning_curve, nested_subsets, verdict
from scarce.segment.task import train
from tests.segment.test_plan import FakeMachine
from tests.shared import synthetic_db


def test_subsets_are_nested_and_seeded():
    stems = [f"s{i:02d}" for i in range(37)]
    a = nested_subsets(stems, [1.0, 0.25, 0.5], seed=3)
    assert list(a) == [0.25, 0.5, 1.0]
    assert [len(v) for v in a.values()] == [10, 19, 37]
    assert set(a[0.25]) < set(a[0.5]) < set(a[1.0]) == set(stems)
    assert a[0.5][:10] == a[0.25]  # one order, cut at growing lengths
    assert nested_subsets(list(reversed(stems)), [0.25, 0.5, 1.0], seed=3) == a  # order-free
    assert nested_subsets(stems, [0.25], seed=4)[0.25] != a[0.25]
    with pytest.raises(InputError, match="fractions"):
        nested_subsets(stems, [0.0, 1.0], seed=0)


def test_subset_database_recomputes_its_metadata(tmp_path):
    db = synthetic_db(tmp_path / "data", [(48, 64)] * 6, radius=5, test=1)
    full = read_metadata(db / "train.lmdb")
    keep = full["sources"][1:4]
    meta = subset_database(db / "train.lmdb", tmp_path / "sub.lmdb", keep)
    stored = read_metadata(tmp_path / "sub.lmdb")
    assert stored["sources"] == keep and stored["num_samples"] == 3
    with SampleStore(tmp_path / "sub.lmdb") as sub, SampleStore(db / "train.lmdb") as whole:
        names = {whole[i].name: i for i in range(len(whole))}
        masks = [sub[i].mask for i in range(len(sub))]
        for i in range(len(sub)):
            np.testing.assert_array_equal(sub[i].image, whole[names[sub[i].name]].image)
        images = np.stack([sub[i].image for i in range(len(sub))]).astype(float)
    fg = sum(int(np.count_nonzero(m)) for m in masks)
    assert stored["class_pixel_counts"] == {"0": 3 * 48 * 64 - fg, "1": fg}
    assert stored["num_instances"] == sum(len(np.unique(m)) - 1 for m in masks)
    assert stored["intensity"]["mean"][0] == pytest.approx(images.mean())
    assert meta["subset_of"]["sources"] == 5
    with pytest.raises(InputError, match="nope"):
        subset_database(db / "train.lmdb", tmp_path / "bad.lmdb", ["nope"])


def test_verdict_rising_and_flat():
    rows = [{"images": 10, "fg_dice": 0.80}, {"images": 20, "fg_dice": 0.86}]
    assert verdict(rows, "fg_dice")["rising"] is True
    rows[1]["fg_dice"] = 0.803
    flat = verdict(rows, "fg_dice")
    assert flat["rising"] is False and "unlikely to help" in flat["message"]
    assert verdict(rows[:1], "fg_dice")["rising"] is None


def test_learning_curve_trains_nested_subsets_on_one_plan(tmp_path):
    db = synthetic_db(tmp_path / "data", [(64, 64)] * 9, radius=6, test=1)

    def short(train_db, test_db, run_dir, cfg, overwrite):
        return train(
            train_db, test_db, run_dir, override(cfg, {"max_steps": 2}), overwrite=overwrite
        )

    out = tmp_path / "curve"
    result = learning_curve(
        db / "train.lmdb",
        db / "test.lmdb",
        out,
        fractions=(0.5, 1.0),
        minutes=0.2,
        amp="off",
        trainer=short,
        machine=FakeMachine(rate=5.0),
    )
    rows = result["rows"]
    assert [r["images"] for r in rows] == [4, 8]
    assert all(0 <= r["fg_dice"] <= 1 and 0 <= r["object_f1"] <= 1 for r in rows)
    assert (out / "curve.png").is_file() and (out / "plan.yaml").is_file()
    assert [int(r["images"]) for r in csv.DictReader((out / "curve.csv").open())] == [4, 8]
    assert read_metadata(out / "data" / "n4" / "train.lmdb")["num_samples"] == 4
    assert result["verdict"]["rising"] in (True, False)

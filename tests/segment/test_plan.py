"""scarce plan: budget, memory and patch rules on tiny synthetic databases with a fake machine."""

from __future__ import annotations

import json
import logging

import pytest

from scarce.config import load_config, override
from scarce.segment import plan as plan_module
from scarce.segment.machine import Candidate, ReaderRate, Timing
from scarce.segment.plan import budget_warning, format_plan, plan_run, write_plan
from scarce.segment.planner import MEMORY_SHARE, RUN_BYTES, TARGET_STEPS
from scarce.segment.survey import survey_database
from tests.shared import synthetic_db

MB = 1 << 20


class FakeMachine:
    """Known costs: a step costs ``rate`` seconds per megapixel (x width**2), memory is linear."""

    def __init__(self, *, rate=0.2, memory=16 << 30, bytes_per_pixel=3000, reader_rate=100.0):
        self.rate, self.bytes_per_pixel, self.reader_rate = rate, bytes_per_pixel, reader_rate
        self.facts = {
            "device": "cpu",
            "name": "fake CPU",
            "cores": 2,
            "threads": 2,
            "memory_bytes": memory,
            "bf16": False,
            "load_1min": 0.0,
        }
        self.base_bytes = 100 * MB
        self.calls = []

    def step_seconds(self, c: Candidate) -> float:
        return 0.001 + self.rate * c.pixels / 1e6 * (c.width / 16) ** 2

    def step_bytes(self, c: Candidate) -> int:
        return int(self.bytes_per_pixel * c.pixels * c.width / 16)

    def step(self, c: Candidate) -> Timing:
        self.calls.append(c)
        return Timing(self.step_seconds(c), self.step_bytes(c))

    def forward(self, c: Candidate, tile: int) -> Timing:
        return Timing(0.3 * self.rate * c.batch * tile * tile / 1e6, c.batch * tile * tile * 500)

    def readers(self, c: Candidate) -> ReaderRate:
        return ReaderRate(self.reader_rate, 0.5)


@pytest.fixture(scope="module")
def disks_db(tmp_path_factory):
    """6 training images 128 x 160 with disks of radius 12 (instances), 1 test image."""
    return synthetic_db(tmp_path_factory.mktemp("disks"), [(128, 160)] * 7, radius=12)


@pytest.fixture(scope="module")
def disks_data(disks_db):
    return survey_database(disks_db / "train.lmdb", disks_db / "test.lmdb")


@pytest.mark.parametrize("minutes", [0.2, 1.0, 5.0])
def test_plan_ends_inside_the_budget(disks_db, disks_data, minutes):
    fake = FakeMachine(rate=2.0)
    plan = plan_run(
        disks_db / "train.lmdb",
        disks_db / "test.lmdb",
        minutes=minutes,
        machine=fake,
        data=disks_data,
    )
    cfg, p = plan.config, plan.predicted
    assert p["total_seconds"] <= 60 * minutes
    c = Candidate.of(cfg)
    assert c in fake.calls  # the chosen sizes were measured, not guessed
    assert cfg.max_steps * fake.step_seconds(c) <= 60 * minutes
    assert cfg.max_steps % cfg.test_every_n_steps == 0  # the last evaluation at max_steps
    assert cfg.max_minutes < minutes  # the hard stop leaves room for the last evaluation


def test_more_budget_buys_steps_and_native_resolution(disks_db, disks_data):
    def planned(minutes):
        return plan_run(
            disks_db / "train.lmdb", minutes=minutes, machine=FakeMachine(rate=2.0), data=disks_data
        ).config

    short, long = planned(0.3), planned(10.0)
    assert long.data.downscale == 1.0 and long.max_steps >= TARGET_STEPS
    assert short.data.downscale > 1.0  # the disks survive a factor 2 (scale table)
    row = next(r for r in disks_data["scale_table"] if r["factor"] == short.data.downscale)
    assert row["dice"] >= 0.99 and row["object_f1"] >= 0.99


def test_plan_respects_memory(disks_db, disks_data):
    memory = 1000 * MB  # limit 600 MiB: 356 MiB held, a batch of 4 at 128 px (312 MiB) too much
    fake = FakeMachine(rate=0.01, memory=memory, bytes_per_pixel=5000)
    plan = plan_run(disks_db / "train.lmdb", minutes=5, machine=fake, data=disks_data)
    cfg = plan.config
    c = Candidate.of(cfg)
    limit = MEMORY_SHARE["cpu"] * memory
    assert fake.base_bytes + RUN_BYTES + fake.step_bytes(c) <= limit
    assert plan.predicted["peak_memory_bytes"] <= limit
    assert cfg.data.batch_size < 4
    assert "memory" in next(x["reason"] for x in plan.choices if x["setting"] == "data.batch_size")


def test_patch_never_exceeds_the_smallest_image(tmp_path):
    db = synthetic_db(tmp_path, [(100, 140), (72, 200), (96, 96), (120, 90)], radius=5)
    data = survey_database(db / "train.lmdb", db / "test.lmdb")
    for minutes in (0.1, 30.0):
        plan = plan_run(db / "train.lmdb", minutes=minutes, machine=FakeMachine(), data=data)
        d = plan.config.data
        smallest = min(round(min(s) / d.downscale) for s in data["shapes"])
        assert d.patch_size <= smallest
        assert d.patch_size % 2**plan.config.model.depth == 0


def test_images_smaller_than_any_patch_are_padded_and_the_plan_says_so(tmp_path):
    db = synthetic_db(tmp_path, [(20, 24)] * 4, radius=3)
    plan = plan_run(db / "train.lmdb", minutes=1, machine=FakeMachine(), data=None)
    assert plan.config.data.patch_size >= 20
    assert any("padded by reflection" in n for n in plan.notes)


def test_too_small_a_budget_warns(disks_db, disks_data):
    plan = plan_run(
        disks_db / "train.lmdb", minutes=0.05, machine=FakeMachine(rate=50.0), data=disks_data
    )
    assert plan.predicted["steps"] < TARGET_STEPS
    assert any("expect an unconverged model" in n for n in plan.notes)


def test_written_plan_is_a_config_train_uses_as_it_is(disks_db, disks_data, tmp_path):
    plan = plan_run(disks_db / "train.lmdb", minutes=2, machine=FakeMachine(), data=disks_data)
    config, report = write_plan(plan, tmp_path / "plan.yaml")
    assert load_config(config) == plan.config
    saved = json.loads(report.read_text())
    assert {c["setting"] for c in saved["choices"]} >= {"data.downscale", "max_steps", "amp"}
    assert saved["predicted"]["total_seconds"] <= 120
    text = format_plan(plan)
    assert "scale table" in text and "predicted:" in text and "data.patch_size" in text


def test_explicit_config_far_over_budget_warns_with_advice(disks_db):
    cfg = override(load_config("default"), {"max_steps": 5000, "max_minutes": 1.0})
    fake = FakeMachine(rate=2.0)
    message = budget_warning(cfg, disks_db / "train.lmdb", disks_db / "test.lmdb", machine=fake)
    assert message is not None and "far over --max-minutes 1" in message
    assert "scarce plan` advises" in message and "max_steps" in message
    fine = override(cfg, {"max_steps": 10})
    assert budget_warning(fine, disks_db / "train.lmdb", machine=fake) is None


def test_train_with_max_minutes_and_no_config_plans_first(disks_db, tmp_path, monkeypatch, caplog):
    from scarce.cli import main

    fake = FakeMachine(rate=20.0)  # slow fake steps: few planned steps, a short real run
    monkeypatch.setattr(plan_module, "LocalMachine", lambda *a, **k: fake)
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="scarce"):
        code = main(
            [
                "train",
                "--train-db",
                str(disks_db / "train.lmdb"),
                "--out",
                str(run),
                "--max-minutes",
                "0.3",
                "--amp",
                "off",
            ]
        )
    assert code == 0
    assert "No --config: planned the run" in caplog.text
    saved = json.loads((run / "plan.json").read_text())
    cfg = load_config(run / "config.yaml")
    assert cfg.max_steps == saved["config"]["max_steps"]
    assert cfg.data.patch_size == saved["config"]["data"]["patch_size"]
    assert saved["measured"]["steps"] <= cfg.max_steps and saved["measured"]["peak_memory_bytes"]


def test_plan_verb_prints_the_table_and_writes_both_files(disks_db, tmp_path, monkeypatch, capsys):
    from scarce.cli import main

    monkeypatch.setattr(plan_module, "LocalMachine", lambda *a, **k: FakeMachine())
    out = tmp_path / "p" / "plan.yaml"
    code = main(
        ["plan", "--train-db", str(disks_db / "train.lmdb"), "--minutes", "2", "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file() and out.with_suffix(".json").is_file()
    assert "predicted:" in printed and f"scarce train --config {out}" in printed
    assert 1.8 < load_config(out).max_minutes < 2


def test_learning_curve_without_a_test_database_is_a_user_error(tmp_path, capsys):
    from scarce.cli import main

    db = synthetic_db(tmp_path / "d", [(32, 32)] * 3, radius=4, test=0)
    code = main(
        ["learning-curve", "--train-db", str(db / "train.lmdb"), "--out", str(tmp_path / "c")]
    )
    assert code == 2 and "--test-db" in capsys.readouterr().err


@pytest.mark.slow
def test_real_machine_plan_trains_as_written(nist_db, tmp_path):
    from scarce.segment.task import train

    plan = plan_run(nist_db / "train.lmdb", nist_db / "test.lmdb", minutes=1.0, amp="off")
    assert plan.measured and plan.predicted["total_seconds"] <= 60
    config, _ = write_plan(plan, tmp_path / "plan.yaml")
    cfg = override(load_config(config), {"max_steps": 3, "test_every_n_steps": 3})
    summary = train(nist_db / "train.lmdb", nist_db / "test.lmdb", tmp_path / "run", cfg)
    assert summary["steps"] == 3 and summary["peak_memory_bytes"] > 0


def test_the_real_machine_measures_a_recipe_with_robust_normalisation(disks_db):
    from scarce.segment.machine import LocalMachine

    cfg = load_config("nuclei-instances")  # instance masks are planned with this recipe
    assert cfg.data.normalization == "robust"
    machine = LocalMachine(disks_db / "train.lmdb", cfg, "cpu")
    assert machine.norm_spec["noise_floor"][0] > 0  # fixed from the training images

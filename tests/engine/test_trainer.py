"""Trainer: resume equivalence, DDP, early stopping, checkpoint safety, run-dir refusal."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from scarce import atomic
from scarce.config import TrainConfig, override
from scarce.engine.checkpoint import CheckpointError, load_checkpoint, load_model
from scarce.engine.schedule import learning_rate
from scarce.engine.trainer import Trainer
from scarce.errors import OutputExistsError
from scarce.segment.task import SegmentationTask, target_of, train

TINY = {
    "data.patch_size": 64,
    "data.batch_size": 2,
    "data.reader_count": 0,
    "data.test_tile_size": 256,
    "model.width": 4,
    "model.depth": 2,
    "optim.warmup_steps": 0,
    "optim.schedule": "constant",
    "optim.learning_rate": 0.003,
    "test_every_n_steps": 5,
    "max_steps": 10,
    "plot_test_images": 1,
    "log_every_n_steps": 5,
    "amp": "off",  # float32 everywhere, so results do not depend on the CPU's bf16 support
}


def tiny_config(**extra) -> TrainConfig:
    """A config that trains in well under a second per step on 2 CPU cores."""
    return override(TrainConfig(), {**TINY, **extra})


def state_of(run_dir) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model_state"]


def test_run_writes_outputs_and_resume_is_exact(nist_db, tmp_path):
    db = nist_db
    full = train(db / "train.lmdb", db / "test.lmdb", tmp_path / "full", tiny_config(max_steps=20))
    assert full["steps"] == 20 and full["stop_reason"] == "max_steps"
    half = tmp_path / "half"
    train(db / "train.lmdb", db / "test.lmdb", half, tiny_config(max_steps=10))
    resumed = train(
        db / "train.lmdb", db / "test.lmdb", half, tiny_config(max_steps=20), resume=True
    )
    assert resumed["steps"] == 20
    a, b = state_of(tmp_path / "full"), state_of(half)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    run = tmp_path / "full"
    for name in (
        "config.yaml",
        "log.txt",
        "metrics.csv",
        "summary.json",
        "plots/loss.png",
        "plots/step_00020.png",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
    ):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    log = (run / "log.txt").read_text()  # INFO lines even though the API caller set no logging
    assert "Training unet" in log and "Run ended at step 20" in log
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    assert {"test_loss", "iou_class1", "dice_class1", "lr", "data_wait_pct"} <= set(rows[0])
    # resumed metrics.csv continues the first run's rows
    assert [int(r["step"]) for r in csv.DictReader((half / "metrics.csv").open())] == [
        5,
        10,
        15,
        20,
    ]


def test_existing_run_dir_is_refused(nist_db, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "something.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--resume.*--overwrite"):
        train(nist_db / "train.lmdb", nist_db / "test.lmdb", run, tiny_config())
    summary = train(
        nist_db / "train.lmdb",
        nist_db / "test.lmdb",
        run,
        tiny_config(max_steps=2, test_every_n_steps=2),
        overwrite=True,
    )
    assert summary["steps"] == 2 and not (run / "something.txt").exists()


def test_early_stopping_triggers_and_says_why(nist_db, tmp_path, caplog):
    # a learning rate of 0 never improves the test loss after the first evaluation
    cfg = tiny_config(
        max_steps=200, test_every_n_steps=2, early_stopping=2, **{"optim.learning_rate": 0.0}
    )
    with caplog.at_level(logging.WARNING, logger="scarce"):
        summary = train(nist_db / "train.lmdb", nist_db / "test.lmdb", tmp_path / "r", cfg)
    assert summary["stop_reason"] == "early_stopping"
    assert summary["steps"] == 6  # best at step 2, then 2 evaluations without improvement
    assert "Early stopping at step 6" in caplog.text
    assert "has not improved for 2 evaluations" in caplog.text


def test_planted_pickle_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pt"
    torch.save({"format": "scarce-checkpoint", "model_state": {}, "x": Payload()}, bad)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(bad)
    assert not (tmp_path / "pwned").exists()


def test_segnet_trains_and_checkpoint_rebuilds(nist_db, tmp_path):
    cfg = tiny_config(max_steps=2, test_every_n_steps=2, **{"model.name": "segnet"})
    train(nist_db / "train.lmdb", nist_db / "test.lmdb", tmp_path / "seg", cfg)
    model, ckpt = load_model(tmp_path / "seg")
    assert type(model).__name__ == "SegNet" and ckpt["step"] == 2
    assert ckpt["task"] == "segment" and ckpt["format_version"] == 2
    assert ckpt["extras"]["normalization"]["mode"] == "zscore"
    assert target_of(ckpt).rule == "class"


def test_fine_tune_from_another_run(nist_db, tmp_path):
    train(nist_db / "train.lmdb", nist_db / "test.lmdb", tmp_path / "a", tiny_config(max_steps=2))
    task = SegmentationTask(nist_db / "train.lmdb", nist_db / "test.lmdb", tiny_config(max_steps=0))
    Trainer(task, tmp_path / "b", init_from=tmp_path / "a").fit()
    a, b = state_of(tmp_path / "a"), state_of(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_learning_rate_schedule():
    cfg = override(
        TrainConfig(),
        {
            "max_steps": 100,
            "optim.warmup_steps": 10,
            "optim.learning_rate": 1.0,
            "optim.min_lr_fraction": 0.0,
        },
    )
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(55, cfg) == pytest.approx(0.5)
    assert learning_rate(100, cfg) == pytest.approx(0.0, abs=1e-9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_environment(rank: int, world: int, port: int) -> None:
    """What torchrun sets for a rank, and one thread per rank."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def _ddp_worker(rank, world, port, db, run, out):
    _rank_environment(rank, world, port)
    cfg = tiny_config(max_steps=4, test_every_n_steps=4, device="cpu")
    trainer = Trainer(SegmentationTask(db / "train.lmdb", db / "test.lmdb", cfg), run)
    trainer.fit()
    torch.save(
        {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        out / f"rank{rank}.pt",
    )


def test_ddp_two_processes_keep_parameters_equal(nist_db, tmp_path):
    world = 2
    torch.multiprocessing.spawn(
        _ddp_worker,
        args=(world, _free_port(), nist_db, tmp_path / "run", tmp_path),
        nprocs=world,
        join=True,
    )
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in s0:
        if "running" in key or "num_batches" in key:
            continue  # BatchNorm buffers are per-rank statistics (not synchronised by DDP)
        torch.testing.assert_close(s0[key], s1[key], msg=key)
    ckpt = load_checkpoint(tmp_path / "run")  # written by rank 0 only, with rank 0's weights
    assert ckpt["step"] == 4
    for key, value in ckpt["model_state"].items():
        if "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(value, s0[key], msg=key)


def test_amp_auto_follows_the_hardware(monkeypatch):
    from scarce.engine import distributed

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: True)
    assert distributed.resolve_amp("auto", cpu) == "bf16"
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: False)
    assert distributed.resolve_amp("auto", cpu) == "off"
    assert distributed.resolve_amp("bf16", cpu) == "bf16"  # explicit modes pass through
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert distributed.resolve_amp("auto", cuda) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert distributed.resolve_amp("auto", cuda) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        distributed.resolve_amp("fp16", cpu)


def test_bf16_run_tracks_float32_and_keeps_float32_weights(nist_db, tmp_path):
    db = nist_db
    losses = {}
    for amp in ("off", "bf16"):
        cfg = tiny_config(amp=amp, max_steps=20)
        summary = train(db / "train.lmdb", db / "test.lmdb", tmp_path / amp, cfg)
        assert summary["amp"] == amp
        rows = list(csv.DictReader((tmp_path / amp / "metrics.csv").open()))
        losses[amp] = [float(r["train_loss"]) for r in rows]
    # same seed, same batches: bf16 autocast changes the arithmetic, not the run
    assert losses["bf16"] == pytest.approx(losses["off"], rel=0.05)
    state = state_of(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def _signal_at(monkeypatch, step: int, signum=signal.SIGUSR1, rank: int | None = None):
    """Send ``signum`` to this process during training step ``step`` (0-based)."""
    real = Trainer.train_step

    def train_step(self, batch):
        if self.step == step and (rank is None or self.runtime.dist.rank == rank):
            os.kill(os.getpid(), signum)
        return real(self, batch)

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_saves_last_pt_and_resume_is_exact(nist_db, tmp_path, monkeypatch, signum):
    db = nist_db
    full = train(db / "train.lmdb", db / "test.lmdb", tmp_path / "full", tiny_config(max_steps=12))
    run = tmp_path / "stopped"
    with monkeypatch.context() as m:
        _signal_at(m, 6, signum)
        stopped = train(db / "train.lmdb", db / "test.lmdb", run, tiny_config(max_steps=12))
    # the step in progress finishes, then the run stops without an evaluation
    assert stopped["stop_reason"] == "signal" and stopped["steps"] == 7
    assert stopped["signal"] == signal.Signals(signum).name and stopped["last_eval"] is None
    assert json.loads((run / "summary.json").read_text())["stop_reason"] == "signal"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 7
    assert [int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open())] == [5]
    resumed = train(
        db / "train.lmdb", db / "test.lmdb", run, tiny_config(max_steps=12), resume=True
    )
    assert resumed["steps"] == full["steps"] == 12
    a, b = state_of(tmp_path / "full"), state_of(run)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert [int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open())] == [5, 10, 12]


def test_resume_drops_metrics_rows_logged_after_the_checkpoint(nist_db, tmp_path):
    run = tmp_path / "run"
    train(nist_db / "train.lmdb", nist_db / "test.lmdb", run, tiny_config(max_steps=10))
    # as if killed after logging step 15 but before its checkpoint, mid-way through a line
    with (run / "metrics.csv").open("a") as fh:
        fh.write("15,1.0,0.5,0.5" + "," * 20 + "\n16,1.0,0.")
    train(
        nist_db / "train.lmdb",
        nist_db / "test.lmdb",
        run,
        tiny_config(max_steps=15),
        resume=True,
    )
    steps = [int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open())]
    assert steps == [5, 10, 15]


def test_a_killed_runs_temporary_checkpoint_is_swept(nist_db, tmp_path, caplog):
    run = tmp_path / "run"
    train(nist_db / "train.lmdb", nist_db / "test.lmdb", run, tiny_config(max_steps=5))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = atomic.temp_path(run / "checkpoints" / "last.pt")
    stale = stale.with_name(stale.name.replace(f"-{os.getpid()}@", f"-{gone.pid}@"))
    stale.write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.INFO, logger="scarce"):
        train(
            nist_db / "train.lmdb",
            nist_db / "test.lmdb",
            run,
            tiny_config(max_steps=10),
            resume=True,
        )
    assert not stale.exists() and f"left by process {gone.pid}" in caplog.text
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 10


def _ddp_signal_worker(rank, world, port, db, run):
    _rank_environment(rank, world, port)
    real = Trainer.train_step

    def train_step(self, batch):  # only rank 1 is signalled, during step 2
        if self.step == 2 and rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(self, batch)

    Trainer.train_step = train_step
    cfg = tiny_config(max_steps=8, test_every_n_steps=8, device="cpu")
    summary = Trainer(SegmentationTask(db / "train.lmdb", db / "test.lmdb", cfg), run).fit()
    assert summary["stop_reason"] == "signal" and summary["steps"] == 3, (rank, summary)


def test_ddp_ranks_stop_together_when_one_is_signalled(nist_db, tmp_path):
    torch.multiprocessing.spawn(
        _ddp_signal_worker,
        args=(2, _free_port(), nist_db, tmp_path / "run"),
        nprocs=2,
        join=True,
    )
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 3
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["signal"] is None and summary["stop_reason"] == "signal"  # rank 0 was told

"""Out-of-memory fallback and gradient accumulation, with a simulated torch.OutOfMemoryError."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from scarce.config import load_config
from scarce.engine.accumulate import OOM_FALLBACK_STEPS, split_batch
from scarce.engine.checkpoint import load_checkpoint
from scarce.engine.trainer import Trainer
from scarce.segment.task import SegmentationTask
from tests.engine.test_trainer import tiny_config


class OutOfMemoryAbove:
    """Wrap a task's loss: micro-batches larger than ``limit`` samples run out of memory."""

    def __init__(self, task, limit: int, from_step: int = 0):
        self.loss, self.limit, self.from_step, self.seen = task.loss, limit, from_step, []

    def __call__(self, forward, batch, runtime, step):
        n = batch["image"].shape[0]
        self.seen.append(n)
        if n > self.limit and step >= self.from_step:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"
            )
        return self.loss(forward, batch, runtime, step)


def run(db, out, cfg, limit=None, from_step=0):
    task = SegmentationTask(db / "train.lmdb", db / "test.lmdb", cfg)
    if limit is not None:
        task.loss = OutOfMemoryAbove(task, limit, from_step)
    return Trainer(task, out).fit(), task


def test_split_batch_keeps_every_sample_once():
    batch = {"image": torch.arange(10).view(5, 2), "target": torch.arange(5), "note": "x"}
    parts = split_batch(batch, 2)
    assert [size for size, _ in parts] == [2, 3]
    assert torch.equal(torch.cat([p["image"] for _, p in parts]), batch["image"])
    assert all(p["note"] == "x" for _, p in parts)
    assert [size for size, _ in split_batch(batch, 9)] == [1] * 5  # at most one part per sample


def test_oom_halves_the_micro_batch_keeps_the_global_batch_and_says_so_once(
    nist_db, tmp_path, caplog
):
    cfg = tiny_config(max_steps=6, test_every_n_steps=3, **{"data.batch_size": 4})
    with caplog.at_level(logging.INFO, logger="scarce"):
        summary, task = run(nist_db, tmp_path / "oom", cfg, limit=1)
    assert summary["steps"] == 6
    assert summary["oom_fallback"] == {
        "step": 0,
        "grad_accumulation": 4,
        "micro_batch": 1,
        "batch": 4,
    }
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "Out of memory" in r.message
    ]
    assert len(warnings) == 1  # 4 -> 2 -> 1 samples: two halvings, one warning
    assert set(task.loss.seen[-4:]) == {1}  # micro-batches of one sample once it fell back
    saved = load_config(tmp_path / "oom" / "config.yaml")
    assert saved.grad_accumulation == 4 and saved.data.batch_size == 4
    assert json.loads((tmp_path / "oom" / "summary.json").read_text())["oom_fallback"]["step"] == 0
    # the same weights as a run that accumulated over 4 micro-batches from the start
    planned, _ = run(
        nist_db,
        tmp_path / "planned",
        tiny_config(
            max_steps=6, test_every_n_steps=3, grad_accumulation=4, **{"data.batch_size": 4}
        ),
    )
    a = load_checkpoint(tmp_path / "oom" / "checkpoints" / "last.pt")["model_state"]
    b = load_checkpoint(tmp_path / "planned" / "checkpoints" / "last.pt")["model_state"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_accumulation_matches_the_whole_batch_within_rounding(nist_db, tmp_path):
    # batch norm and the batch Dice see micro-batches: compare a model without them
    extra = {"model.norm": "none", "loss.name": "ce", "data.batch_size": 4, "max_steps": 3}
    whole, _ = run(nist_db, tmp_path / "whole", tiny_config(**extra))
    split, _ = run(nist_db, tmp_path / "split", tiny_config(grad_accumulation=2, **extra))
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")["model_state"]
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["model_state"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_oom_after_the_first_steps_is_raised(nist_db, tmp_path):
    cfg = tiny_config(max_steps=OOM_FALLBACK_STEPS + 2, test_every_n_steps=100)
    with pytest.raises(torch.OutOfMemoryError):
        run(nist_db, tmp_path / "late", cfg, limit=1, from_step=OOM_FALLBACK_STEPS)

"""SIGTERM, SIGUSR1 and SIGINT stop ``scarce train`` gracefully; ``--resume`` continues exactly.

Each signal arrives at a seeded random step. The run finishes that step, saves ``last.pt``,
writes ``summary.json`` with ``stop_reason: signal``, ends its reader processes and exits with
75; the resumed run ends with the weights of the uninterrupted run.
"""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest

from scarce.engine.checkpoint import load_checkpoint
from scarce.lifecycle import EXIT_STOPPED
from tests.faults.procs import STEPS, Run, assert_same_weights, train_args, weights


@pytest.mark.parametrize(
    ("signum", "group", "seed"),
    [
        (signal.SIGTERM, False, 0),  # kill PID
        (signal.SIGUSR1, False, 1),  # sbatch --signal=USR1@90
        (signal.SIGINT, True, 2),  # Ctrl-C: the trainer and its readers get it
        (signal.SIGTERM, True, 3),  # scancel: every process of the job step gets it
    ],
)
def test_a_signal_stops_training_and_resume_is_exact(
    signum, group, seed, reference, nist_db, tmp_path, record
):
    step = int(np.random.default_rng(seed).integers(2, STEPS - 2))
    out = tmp_path / "run"
    run = Run(train_args(nist_db, out), tmp_path / "log.txt", group=group)
    try:
        run.wait_for(f"step {step}/{STEPS}")
        run.signal(signum, group=group)
        assert run.wait(timeout=60) == EXIT_STOPPED, run.output()
        name = signal.Signals(signum).name
        summary = json.loads((out / "summary.json").read_text())
        assert summary["stop_reason"] == "signal" and summary["signal"] == name
        stopped_at = summary["steps"]
        assert step <= stopped_at < STEPS
        assert f"Stopped by {name} after step {stopped_at}" in run.output()
        assert "last.pt saved, continue with --resume" in run.output()
        assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == stopped_at
        assert run.survivors(timeout=10) == []  # reader worker and fork server ended too
    finally:
        run.end()
    record(f"signals: {name} to the {'process group' if group else 'trainer'}, resumed exactly")
    resumed = Run(train_args(nist_db, out, "--resume"), tmp_path / "resume.txt")
    try:
        assert resumed.wait() == 0, resumed.output()
    finally:
        resumed.end()
    assert_same_weights(reference.weights, weights(out))

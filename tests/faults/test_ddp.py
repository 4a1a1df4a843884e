"""DDP faults on 2 CPU ranks (``scarce train --nproc 2``, torchrun, gloo).

- a rank killed with SIGKILL: the run ends within 60 s, non-zero, naming the dead rank, and no
  process of it is left;
- SIGTERM to ``scarce``: every rank stops at the same step, ``last.pt`` is saved, the exit code
  is 75, and ``--resume`` reaches the weights of an uninterrupted 2-rank run;
- SIGKILL to ``scarce``: torchrun and the ranks end too (they still save ``last.pt``).
"""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest

from scarce.engine.checkpoint import load_checkpoint
from scarce.lifecycle import EXIT_STOPPED
from tests.faults.procs import Run, assert_same_weights, train_args, weights

STEPS = 12


def ddp_args(db, out, *extra) -> list:
    args = train_args(db, out, "--nproc", "2", *extra)
    return [*args[: args.index("--max-steps")], "--max-steps", STEPS,
            *args[args.index("--max-steps") + 2 :]]  # fmt: skip


def rank_process(run: Run, rank: int) -> psutil.Process:
    """The training process of ``rank`` (not its reader worker or fork server)."""
    for pid in sorted(run.tree):
        try:
            p = psutil.Process(pid)
            line = " ".join(p.cmdline())
            if "-m scarce train" in line and p.environ().get("RANK") == str(rank):
                return p
        except psutil.Error:
            continue
    raise AssertionError(f"no process of rank {rank} among {sorted(run.tree)}")


@pytest.fixture(scope="module")
def ddp_reference(nist_db, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp-reference") / "run"
    run = Run(ddp_args(nist_db, out), out.parent / "log.txt")
    try:
        assert run.wait() == 0, run.output()
    finally:
        run.end()
    return weights(out)


def test_a_killed_rank_ends_the_run_within_60_s_naming_it(nist_db, tmp_path, record):
    out = tmp_path / "run"
    run = Run(ddp_args(nist_db, out, "--max-steps", 10_000), tmp_path / "log.txt")
    try:
        run.wait_for("step 3/", timeout=180)
        victim = rank_process(run, 1)
        victim.send_signal(signal.SIGKILL)
        start = time.monotonic()
        code = run.wait(timeout=60)
        took = time.monotonic() - start
        record("ddp: rank killed, run ended (seconds, summed)", round(took))
        record("ddp: rank killed, run ended within 60 s")
        assert code != 0 and took < 60
        assert f"rank 1 (pid {victim.pid})" in run.output(), run.output()[-3000:]
        assert run.survivors(timeout=30) == []
    finally:
        run.end()


def test_sigterm_stops_every_rank_at_one_step_and_resume_is_exact(
    nist_db, ddp_reference, tmp_path, record
):
    out = tmp_path / "run"
    run = Run(ddp_args(nist_db, out), tmp_path / "log.txt")
    try:
        run.wait_for("step 4/", timeout=180)
        run.signal(signal.SIGTERM)
        assert run.wait(timeout=90) == EXIT_STOPPED, run.output()[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["stop_reason"] == "signal" and summary["world_size"] == 2
        assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == summary["steps"]
        assert run.survivors(timeout=30) == []
    finally:
        run.end()
    resumed = Run(ddp_args(nist_db, out, "--resume"), tmp_path / "resume.txt")
    try:
        assert resumed.wait() == 0, resumed.output()[-3000:]
    finally:
        resumed.end()
    assert_same_weights(ddp_reference, weights(out))
    record("ddp: SIGTERM stops resumed exactly")


def test_kill_9_of_scarce_ends_torchrun_and_the_ranks(nist_db, tmp_path, record):
    out = tmp_path / "run"
    run = Run(ddp_args(nist_db, out, "--max-steps", 10_000), tmp_path / "log.txt")
    try:
        run.wait_for("step 3/", timeout=180)
        run.kill()
        assert run.survivors(timeout=60) == []
        record("ddp: launcher killed, no process left")
        if (out / "checkpoints" / "last.pt").exists():
            load_checkpoint(out / "checkpoints" / "last.pt")  # whole
    finally:
        run.end()

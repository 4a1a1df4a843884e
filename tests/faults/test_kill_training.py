"""``kill -9`` during training and during a checkpoint write, at seeded random moments.

After each kill: no process of the run is left (trainer, fork server, reader worker), the
checkpoints on disk are whole (the previous ones, or none), and ``--resume`` carries the run to
the same final weights as a run that was never interrupted.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from scarce.atomic import parse_temp
from scarce.engine.checkpoint import load_checkpoint
from tests.faults.procs import EVERY, Run, assert_same_weights, train_args, weights


def check_after_kill(run: Run, out) -> None:
    """Nothing of the killed run lives; what is on disk under a final name is whole."""
    assert run.survivors() == [], "processes of the killed run still alive"
    for name in ("last.pt", "best.pt"):
        path = out / "checkpoints" / name
        if path.exists():
            ckpt = load_checkpoint(path)  # a half-written file would not load
            assert ckpt["step"] % EVERY == 0
    if (out / "summary.json").exists():
        json.loads((out / "summary.json").read_text())


def finish(args_of, out, log) -> Run:
    """Resume (or start again when no checkpoint was saved yet) and run to the end."""
    resume = (out / "checkpoints" / "last.pt").is_file()
    run = Run(args_of("--resume" if resume else "--overwrite"), log)
    try:
        assert run.wait() == 0, run.output()
    finally:
        run.end()
    return run


@pytest.mark.parametrize("seed", range(3))
def test_kill_9_during_training_then_resume_gives_the_same_weights(
    seed, reference, nist_db, tmp_path, record
):
    rng = np.random.default_rng(seed)
    out = tmp_path / "run"

    def args_of(*extra):
        return train_args(nist_db, out, *extra)

    first = True
    for attempt in range(2):  # two kills at random moments, then run to the end
        resume = (out / "checkpoints" / "last.pt").is_file()
        run = Run(args_of(*(["--resume"] if resume else [] if first else ["--overwrite"])),
                  tmp_path / f"log{attempt}.txt")  # fmt: skip
        first = False
        try:
            run.wait_for("Training unet")
            time.sleep(rng.uniform(0.0, reference.training_s))
            if run.proc.poll() is not None:
                break  # it finished first: nothing to kill
            run.kill()
            record("training: SIGKILL at a random moment")
            check_after_kill(run, out)
        finally:
            run.end()
    finish(args_of, out, tmp_path / "final.txt")
    assert_same_weights(reference.weights, weights(out))
    record("training: killed runs resumed to the same weights")


SLOW_CHECKPOINTS = """
import sys, time
from scarce import atomic
from scarce.cli import main

real = atomic.write_bytes

def slow(path, data, durable=False):  # checkpoints written in 8 KiB pieces, 10 ms apart
    if not str(path).endswith(".pt"):
        return real(path, data, durable=durable)
    with atomic.atomic_output(path, needed=len(data), durable=durable) as tmp:
        with open(tmp, "wb") as fh:
            view = memoryview(data)
            for i in range(0, len(view), 8192):
                fh.write(view[i : i + 8192])
                fh.flush()
                time.sleep(0.01)
    return path

atomic.write_bytes = slow
sys.exit(main(sys.argv[1:]))
"""


def _temps(folder, nonempty: bool = False) -> set:
    """Scarce temporary files in ``folder`` (with ``nonempty``: those already holding bytes)."""
    found = set()
    for p in folder.glob(".*") if folder.is_dir() else ():
        try:
            if parse_temp(p.name) and (not nonempty or p.stat().st_size > 0):
                found.add(p)
        except FileNotFoundError:  # renamed into place meanwhile
            pass
    return found


@pytest.mark.parametrize("seed", range(3))
def test_kill_9_while_a_checkpoint_is_written(seed, reference, nist_db, tmp_path, record):
    rng = np.random.default_rng(100 + seed)
    out = tmp_path / "run"
    target = int(rng.integers(1, 7))  # kill during the target-th checkpoint file written
    run = Run(train_args(nist_db, out), tmp_path / "log.txt", code=SLOW_CHECKPOINTS)
    try:
        seen: set = set()
        while len(seen) < target:
            now = _temps(out / "checkpoints", nonempty=True)
            seen |= now
            assert run.proc.poll() is None, run.output()
            time.sleep(0.002)
        half = next(iter(now))
        time.sleep(rng.uniform(0.0, 0.1))
        run.kill()
        record("checkpoint write: SIGKILL while a .pt file was half written")
        assert half.exists(), "the temporary file should be left by a SIGKILL"
        check_after_kill(run, out)
    finally:
        run.end()
    resumed = finish(lambda *e: train_args(nist_db, out, *e), out, tmp_path / "final.txt")
    assert "(no longer running)" in resumed.output() and not half.exists()  # swept, and said
    assert _temps(out / "checkpoints") == set()
    assert_same_weights(reference.weights, weights(out))
    record("checkpoint write: killed runs resumed to the same weights")

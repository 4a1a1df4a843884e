"""Running ``scarce`` in real subprocesses, watching their process trees, killing them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from scarce.engine.checkpoint import load_checkpoint

SRC = Path(__file__).resolve().parents[2] / "src"
TINY_TRAIN = [
    "--config", "quick-cpu", "--early-stopping", "0", "--reader-count", "1", "--amp", "off",
    "--set", "data.patch_size=64", "--set", "data.batch_size=2", "--set", "model.width=4",
    "--set", "model.depth=2", "--set", "optim.warmup_steps=0", "--set", "optim.schedule=constant",
    "--set", "log_every_n_steps=1",
]  # fmt: skip

STEPS = 20
EVERY = 5


def train_args(db, out, *extra) -> list:
    return [
        "train",
        "--train-db", db / "train.lmdb", "--test-db", db / "test.lmdb", "--out", out,
        "--max-steps", STEPS, "--test-every-n-steps", EVERY, *TINY_TRAIN, *extra,
    ]  # fmt: skip


def weights(run_dir) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model_state"]


def assert_same_weights(a: dict, b: dict) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@dataclass
class Reference:
    weights: dict
    training_s: float  # from "Training unet" to the end of the run


def environment(**extra: str) -> dict:
    """This checkout's ``src`` first on the path, one thread per process (reproducible)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).strip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", **extra)
    return env


class Run:
    """``python -m scarce ARGS`` (or ``python -c CODE ARGS``, or ``PROGRAM ARGS``) with its
    process tree recorded.

    A thread samples the descendants every 50 ms, so that after a ``kill -9`` the test knows
    every process the run had started (reader workers, fork server, torchrun, ranks).
    """

    def __init__(
        self,
        args: list,
        log: Path,
        *,
        code: str | None = None,
        program: list | None = None,
        group: bool = False,
        **env,
    ):
        self.log = Path(log)
        self.fh = self.log.open("w")
        head = [sys.executable, "-c", code] if code else [sys.executable, "-m", "scarce"]
        self.proc = subprocess.Popen(
            [*map(str, program or head), *map(str, args)],
            stdout=self.fh,
            stderr=subprocess.STDOUT,
            env=environment(**env),
            start_new_session=group,  # its own process group, to signal all of it at once
        )
        self.tree: set[int] = {self.proc.pid}
        self._watch = threading.Thread(target=self._record, daemon=True)
        self._watch.start()

    def _record(self) -> None:
        root = psutil.Process(self.proc.pid)
        while self.proc.poll() is None:
            try:
                self.tree.update(p.pid for p in root.children(recursive=True))
            except psutil.Error:
                pass
            time.sleep(0.05)

    def output(self) -> str:
        if not self.fh.closed:
            self.fh.flush()
        return self.log.read_text()

    def wait_for(self, text: str, timeout: float = 120.0) -> float:
        """Seconds until ``text`` appears in the output (fails if the run ends first)."""
        start = time.monotonic()
        while text not in self.output():
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended before {text!r}:\n{self.output()[-3000:]}")
            if time.monotonic() - start > timeout:
                raise AssertionError(f"no {text!r} in {timeout} s:\n{self.output()[-3000:]}")
            time.sleep(0.02)
        return time.monotonic() - start

    def signal(self, signum: int, group: bool = False) -> None:
        """Send ``signum`` to the top process, or (``group``) to its whole process group, as
        Ctrl-C in a terminal or SLURM's ``scancel`` do."""
        if group:
            os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)

    def wait(self, timeout: float = 300.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.fh.close()

    def kill(self) -> None:
        """SIGKILL the top process (nothing runs in it afterwards) and reap it."""
        self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def survivors(self, timeout: float = 15.0) -> list[str]:
        """Processes of this run still alive ``timeout`` s from now (zombies count as ended)."""
        end = time.monotonic() + timeout
        while True:
            alive = [p for p in map(_alive, self.tree) if p]
            if not alive or time.monotonic() > end:
                return alive
            time.sleep(0.1)

    def end(self) -> None:
        """Kill whatever of this run is still alive (after a failed test), by pid."""
        for pid in self.tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _alive(pid: int) -> str | None:
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return f"{pid} {' '.join(p.cmdline())[:120]}"
    except psutil.Error:
        return None


def scarce(args: list, log: Path, timeout: float = 300.0, **env: str) -> tuple[int, str]:
    """Run ``scarce ARGS`` to the end; its exit code and output."""
    run = Run(args, log, **env)
    code = run.wait(timeout)
    return code, run.output()

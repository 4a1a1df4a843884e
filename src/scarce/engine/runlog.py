"""What a training run writes besides checkpoints: log, metrics table, TensorBoard, plots, summary.

Run folder layout (see the README)::

    RUN_DIR/config.yaml           resolved config
    RUN_DIR/log.txt               the log (same lines as the terminal)
    RUN_DIR/metrics.csv           one row per evaluation
    RUN_DIR/summary.json          steps, wall time, best test loss/Dice, why the run ended
    RUN_DIR/tensorboard/          TensorBoard events
    RUN_DIR/plots/loss.png        train and test loss curves, and the task's headline metric
    RUN_DIR/plots/step_XXXXX.png  test examples, drawn by the task at each evaluation
    RUN_DIR/checkpoints/{last,best}.pt

The metrics columns after ``test_loss`` come from the task (segmentation: IoU and Dice per
class and the mean foreground Dice). Only rank 0 creates a :class:`RunLog`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from scarce import atomic
from scarce.config import config_from_dict
from scarce.engine.checkpoint import load_checkpoint
from scarce.errors import MissingInputError, OutputExistsError

logger = logging.getLogger("scarce")


class RunLog:
    """Writer of a run folder's log, metrics, TensorBoard events, plots and summary.

    Parameters
    ----------
    run_dir : pathlib.Path
        Existing run folder.
    columns : sequence of str
        The task's metric columns, written between ``test_loss`` and ``lr``.
    headline : str
        The task's main metric (one of ``columns``), drawn beside the losses.
    tensorboard : bool
        Write TensorBoard events (needs the ``tensorboard`` package).
    """

    def __init__(
        self, run_dir: Path, columns: Sequence[str], headline: str, tensorboard: bool = True
    ):
        self.run_dir = Path(run_dir)
        (self.run_dir / "plots").mkdir(parents=True, exist_ok=True)
        self.headline = headline
        self.metrics_path = self.run_dir / "metrics.csv"
        self.handler = logging.FileHandler(self.run_dir / "log.txt")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(self.handler)
        # log.txt gets INFO lines even when the caller (Python API, not the CLI) left logging
        # unconfigured; the level is restored by close()
        self._saved_level = logger.level
        if not logger.isEnabledFor(logging.INFO):
            logger.setLevel(logging.INFO)
        self.columns = ["step", "time_s", "train_loss", "test_loss", *columns]
        self.columns += ["lr", "data_wait_pct"]
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                logger.warning("tensorboard is not installed; no TensorBoard events written")

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Log one scalar to TensorBoard."""
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def evaluation(self, row: dict) -> None:
        """Append one evaluation row to ``metrics.csv`` and TensorBoard, redraw the loss plot.

        The row is appended with a single write, so a kill leaves at most one partial last
        line, which :meth:`keep_until` drops when the run is resumed.
        """
        new = not self.metrics_path.exists()
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=self.columns, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: _fmt(row.get(k)) for k in self.columns})
        with self.metrics_path.open("a", newline="") as fh:
            fh.write(text.getvalue())
        for key in self.columns[2:]:
            if row.get(key) is not None:
                self.scalar(f"eval/{key}", float(row[key]), row["step"])
        if self.writer is not None:
            self.writer.flush()
        self.plot_losses()

    def keep_until(self, step: int) -> None:
        """Drop the ``metrics.csv`` rows after ``step`` (and a partial last line) on resume.

        A run killed after an evaluation was logged but before its checkpoint was saved
        repeats that evaluation when resumed; without this its row would appear twice.
        """
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines(keepends=True)
        kept = [lines[0]] if lines else []
        for line in lines[1:]:
            cells = next(csv.reader([line]), [])
            if line.endswith("\n") and len(cells) == len(self.columns) and float(cells[0]) <= step:
                kept.append(line)
        if kept != lines:
            atomic.write_text(self.metrics_path, "".join(kept))
            logger.info(
                "metrics.csv: dropped %d row(s) after step %d", len(lines) - len(kept), step
            )

    def read_metrics(self) -> list[dict]:
        """Rows of ``metrics.csv`` as dicts of floats (empty list if none yet)."""
        return read_metrics(self.metrics_path)

    def plot_losses(self) -> None:
        """Draw ``plots/loss.png``: train and test loss against steps, and the headline metric."""
        rows = self.read_metrics()
        if not rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in rows]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.plot(steps, [r["train_loss"] for r in rows], "o-", label="train")
        ax1.plot(steps, [r["test_loss"] for r in rows], "o-", label="test")
        ax1.set_xlabel("step")
        ax1.set_ylabel("loss")
        ax1.legend()
        ax2.plot(steps, [r.get(self.headline) for r in rows], "o-", color="C2")
        ax2.set_xlabel("step")
        ax2.set_ylabel(f"test {self.headline}")
        fig.tight_layout()
        with atomic.atomic_output(self.run_dir / "plots" / "loss.png") as tmp:
            fig.savefig(tmp, dpi=80, format="png")
        plt.close(fig)

    @property
    def plots_dir(self) -> Path:
        """``RUN_DIR/plots``, where the task draws its examples."""
        return self.run_dir / "plots"

    def summary(self, data: dict) -> None:
        """Write ``summary.json`` (read by ``scarce history``)."""
        atomic.write_text(self.run_dir / "summary.json", json.dumps(data, indent=2))

    def close(self) -> None:
        """Flush and detach the log file and TensorBoard writer."""
        logger.removeHandler(self.handler)
        logger.setLevel(self._saved_level)
        self.handler.close()
        if self.writer is not None:
            self.writer.close()


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def read_metrics(path: Path) -> list[dict]:
    """Rows of a ``metrics.csv`` as dicts of floats (``None`` for empty cells)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open() as fh:
        return [
            {k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
            for row in csv.DictReader(fh)
        ]


def open_run(run_dir, cfg, *, resume: bool = False, overwrite: bool = False):
    """Check a run folder before a task is built; on resume, return the saved config.

    Parameters
    ----------
    run_dir : path-like
        The run folder.
    cfg : EngineConfig subclass
        The requested config. On resume only its ``max_steps``, ``max_minutes`` and
        ``early_stopping`` are used (they may be raised to continue a finished run); the rest
        comes from ``last.pt``.
    resume, overwrite : bool
        Continue ``run_dir/checkpoints/last.pt``; replace an existing folder.

    Returns
    -------
    cfg : EngineConfig subclass
        The config to build the task with.
    checkpoint : dict or None
        ``last.pt`` when resuming.

    Raises
    ------
    OutputExistsError
        If ``run_dir`` exists (and is not empty) without ``resume`` or ``overwrite``.
    MissingInputError
        If ``resume`` is asked and there is no ``last.pt``.
    """
    run_dir = Path(run_dir)
    if resume:
        last = run_dir / "checkpoints" / "last.pt"
        if not last.is_file():
            raise MissingInputError(f"--resume: {last} does not exist; nothing to resume")
        ckpt = load_checkpoint(last)
        saved = config_from_dict(ckpt["config"], type(cfg))
        keep = {k: getattr(cfg, k) for k in ("max_steps", "max_minutes", "early_stopping")}
        return replace(saved, **keep), ckpt
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{run_dir} already exists; pass --resume to continue it or --overwrite to replace it"
        )
    return cfg, None


class StepProgress:
    """Progress of training steps: a tqdm bar on a terminal, else a log line every ``every``
    steps; the mean training loss of those steps goes to TensorBoard (``train/loss``).

    Parameters
    ----------
    log : RunLog or None
        The run's log; ``None`` on ranks other than 0 (they report nothing).
    max_steps, initial, every : int
        Steps in all, the step training starts from (a resume), the reporting interval.
    samples_per_step : int
        Samples per optimiser step over all ranks (for the samples/s rate).
    """

    def __init__(self, log, *, max_steps: int, initial: int, every: int, samples_per_step: int):
        self.log, self.max_steps, self.every = log, max_steps, every
        self.initial, self.samples_per_step = initial, samples_per_step
        self.start = time.perf_counter()
        self.bar = None
        if log is not None and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, losses: Sequence[float], wait_fraction: float) -> None:
        """After step ``step`` (1-based count): report every ``every`` steps.

        ``losses`` are the training losses since the last evaluation; ``wait_fraction`` the
        share of time spent waiting for batches (0..1).
        """
        if self.log is None or step % self.every:
            return
        rate = self.samples_per_step * step / max(time.perf_counter() - self.start, 1e-9)
        loss = float(np.mean(losses[-self.every :])) if losses else math.nan
        wait = 100 * wait_fraction
        self.log.scalar("train/loss", loss, step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.1f}", wait=f"{wait:.0f}%")
        else:
            logger.info(
                "step %d/%d loss %.4f, %.1f samples/s, data wait %.0f%%",
                *(step, self.max_steps, loss, rate, wait),
            )

    def close(self) -> None:
        """Close the bar, if any."""
        if self.bar is not None:
            self.bar.close()


def stop_reason_text(reason: str, cfg) -> str:
    """Words for a run's ``stop_reason`` (``summary.json``), with the limit it reached.

    ``cfg`` is the run's config (``max_steps``, ``max_minutes``); unknown reasons (a task's
    own, e.g. an aligner that collapsed) are returned as they are.
    """
    known = {
        "max_steps": f"reached max_steps = {cfg.max_steps}",
        "max_minutes": f"time budget of {cfg.max_minutes} minutes used",
        "early_stopping": "early stopping",
        "signal": "stopped by a signal; resume with --resume",
    }
    return known.get(reason, reason)

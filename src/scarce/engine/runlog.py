"""What a training run writes besides checkpoints: log, metrics table, TensorBoard, plots, summary.

Run folder layout (see the README)::

    RUN_DIR/config.yaml           resolved config
    RUN_DIR/log.txt               the log (same lines as the terminal)
    RUN_DIR/metrics.csv           one row per evaluation
    RUN_DIR/summary.json          steps, wall time, best test loss/Dice, why the run ended
    RUN_DIR/tensorboard/          TensorBoard events
    RUN_DIR/plots/loss.png        train and test loss curves
    RUN_DIR/plots/step_XXXXX.png  test images with truth and prediction outlines
    RUN_DIR/checkpoints/{last,best}.pt

Only rank 0 creates a :class:`RunLog`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger("scarce")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunLog:
    """Writer of a run folder's log, metrics, TensorBoard events, plots and summary.

    Parameters
    ----------
    run_dir : pathlib.Path
        Existing run folder.
    class_names : list of str
        Names of the K target classes (``metrics.csv`` gets ``iou_<name>``/``dice_<name>``).
    tensorboard : bool
        Write TensorBoard events (needs the ``tensorboard`` package).
    """

    def __init__(self, run_dir: Path, class_names: list[str], tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        (self.run_dir / "plots").mkdir(parents=True, exist_ok=True)
        self.class_names = class_names
        self.metrics_path = self.run_dir / "metrics.csv"
        self.handler = logging.FileHandler(self.run_dir / "log.txt")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(self.handler)
        # log.txt gets INFO lines even when the caller (Python API, not the CLI) left logging
        # unconfigured; the level is restored by close()
        self._saved_level = logger.level
        if not logger.isEnabledFor(logging.INFO):
            logger.setLevel(logging.INFO)
        self.columns = ["step", "time_s", "train_loss", "test_loss"]
        self.columns += [f"iou_{n}" for n in class_names] + [f"dice_{n}" for n in class_names]
        self.columns += ["mean_dice", "lr", "data_wait_pct"]
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
        """Append one evaluation row to ``metrics.csv`` and TensorBoard, redraw the loss plot."""
        new = not self.metrics_path.exists()
        with self.metrics_path.open("a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: _fmt(row.get(k)) for k in self.columns})
        for key in self.columns[2:]:
            if row.get(key) is not None:
                self.scalar(f"eval/{key}", float(row[key]), row["step"])
        if self.writer is not None:
            self.writer.flush()
        self.plot_losses()

    def read_metrics(self) -> list[dict]:
        """Rows of ``metrics.csv`` as dicts of floats (empty list if none yet)."""
        return read_metrics(self.metrics_path)

    def plot_losses(self) -> None:
        """Draw ``plots/loss.png``: train and test loss against steps, and mean Dice."""
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
        ax2.plot(steps, [r["mean_dice"] for r in rows], "o-", color="C2")
        ax2.set_xlabel("step")
        ax2.set_ylabel("test mean foreground Dice")
        fig.tight_layout()
        fig.savefig(self.run_dir / "plots" / "loss.png", dpi=80)
        plt.close(fig)

    def plot_predictions(self, step: int, examples: list[tuple]) -> Path | None:
        """Draw ``plots/step_XXXXX.png``: each test image with truth and prediction outlines.

        Parameters
        ----------
        examples : list of (name, image (C, H, W) float32, truth (H, W), prediction (H, W))
        """
        if not examples:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from skimage.segmentation import find_boundaries

        fig, axes = plt.subplots(1, len(examples), figsize=(4 * len(examples), 4), squeeze=False)
        for ax, (name, image, truth, pred) in zip(axes[0], examples):
            show = image[:3].transpose(1, 2, 0) if image.shape[0] == 3 else image[0]
            lo, hi = np.percentile(show, (1, 99.5))
            ax.imshow(np.clip((show - lo) / max(hi - lo, 1e-6), 0, 1), cmap="gray")
            for labels, colour in ((truth, (0, 1, 0, 1)), (pred, (1, 0, 1, 1))):
                edge = find_boundaries(labels, mode="inner")
                overlay = np.zeros((*edge.shape, 4))
                overlay[edge] = colour
                ax.imshow(overlay)
            ax.set_title(f"{name}\ngreen: truth, magenta: prediction", fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        path = self.run_dir / "plots" / f"step_{step:05d}.png"
        fig.savefig(path, dpi=72)
        plt.close(fig)
        return path

    def summary(self, data: dict) -> None:
        """Write ``summary.json`` (read by ``scarce history``)."""
        atomic_write_text(self.run_dir / "summary.json", json.dumps(data, indent=2))

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

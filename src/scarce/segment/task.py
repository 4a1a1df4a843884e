"""Segmentation as a task of the training engine: what is segmentation-specific in a run.

:class:`SegmentationTask` gives :class:`~scarce.engine.trainer.Trainer` a U-Net or SegNet,
the augmenting readers of an image/mask database, the Dice/cross-entropy loss, the
sliding-window evaluation of the test database (loss, IoU and Dice per class), the
checkpoint extras (normalisation and :class:`~scarce.segment.targets.TargetSpec`) and the
plots of test images with truth and prediction outlines. :func:`train` (``scarce train``)
builds one and runs the engine.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from scarce import atomic
from scarce.config import TrainConfig
from scarce.data.drift import training_statistics
from scarce.data.inspect import sample_images
from scarce.data.normalize import normalize
from scarce.data.store import SampleStore, read_metadata
from scarce.engine import distributed
from scarce.engine.runlog import open_run
from scarce.engine.task import Evaluation, Runtime
from scarce.engine.tiling import sliding_window_logits
from scarce.engine.trainer import Trainer
from scarce.errors import CheckpointError
from scarce.models import build_model
from scarce.segment.losses import SegmentationLoss, class_weights_from_counts
from scarce.segment.metrics import confusion_matrix, pixel_metrics
from scarce.segment.readers import (
    iter_test_images,
    make_train_loader,
    normalization_spec_for,
)
from scarce.segment.scale import downscale_image, relative_factor, upsample_logits
from scarce.segment.targets import TargetSpec, resolve_target

logger = logging.getLogger("scarce")
STATISTICS_SAMPLES = 100  # training images whose normalised statistics go into checkpoints


class SegmentationTask:
    """Train a segmentation network on an LMDB training database, testing on another.

    Parameters
    ----------
    train_db, test_db : path-like
        LMDB databases written by ``scarce ingest`` (``test_db`` may be ``None``: no
        evaluation, no early stopping, ``best.pt`` = ``last.pt``).
    cfg : TrainConfig, optional
        The run's config (defaults when omitted).

    Attributes
    ----------
    target : TargetSpec
        The training target, resolved once from the training database and ``cfg.data``.
    norm_spec : dict
        The normalisation (:func:`scarce.data.normalize.normalization_spec`).
    input_statistics : dict
        Intensity statistics of up to :data:`STATISTICS_SAMPLES` normalised training images
        (evenly spaced), from :func:`scarce.data.drift.training_statistics`; prediction
        warns about images far outside them.
    scale : dict
        ``downscale`` (``data.downscale``) and ``pixel_size_um``: the size of the pixels the
        network sees (the training database's ``pixel_size_um`` times ``downscale``, µm;
        ``None`` when unknown). Test images are shrunk to it (:mod:`scarce.segment.scale`).

    Raises
    ------
    scarce.errors.StoreError
        If ``train_db`` is not a Scarce database.
    """

    name = "segment"
    headline = "mean_dice"
    partial_forward = False

    def __init__(self, train_db, test_db=None, cfg: TrainConfig | None = None):
        self.cfg = cfg or TrainConfig()
        self.train_db = Path(train_db)
        self.test_db = Path(test_db) if test_db else None
        self.metadata = read_metadata(self.train_db)
        data = self.cfg.data
        self.target = resolve_target(
            self.metadata,
            data.target,
            boundary_width=data.boundary_width,
            ignore_label=data.ignore_label,
        )
        self.norm_spec = normalization_spec_for(self.train_db, self.cfg)
        self.input_statistics = self._input_statistics()
        train_px = self.metadata.get("pixel_size_um")
        model_px = train_px * data.downscale if train_px else None
        self.scale = {"downscale": data.downscale, "pixel_size_um": model_px}
        test_px = read_metadata(self.test_db).get("pixel_size_um") if self.test_db else None
        self.test_factor = relative_factor(model_px, test_px, data.downscale)
        names = self.target.class_names
        self.columns = (*(f"iou_{n}" for n in names), *(f"dice_{n}" for n in names), "mean_dice")
        self.samples_per_batch = data.batch_size
        self.loss_fn = SegmentationLoss(
            self.cfg.loss.name,
            self.target.num_classes,
            class_weights=self._class_weights(),
            ignore_label=self.target.ignore_label,
        )

    def _input_statistics(self) -> dict:
        """Normalised statistics of up to STATISTICS_SAMPLES evenly spaced training samples."""
        images = sample_images(self.train_db, STATISTICS_SAMPLES)
        return training_statistics(normalize(image, self.norm_spec) for image in images)

    def build_model(self) -> torch.nn.Module:
        """The configured network for the database's channels and the target's classes."""
        m = self.cfg.model
        return build_model(
            m.name,
            self.metadata["channels"],
            self.target.num_classes,
            depth=m.depth,
            width=m.width,
            widths=m.widths,
            norm=m.norm,
            dropout=m.dropout,
            upsampling=m.upsampling,
        )

    def describe(self) -> str:
        """Database, classes, target rule, batch and patch size."""
        t, d = self.target, self.cfg.data
        return (
            f"{self.train_db}: {t.num_classes} classes {list(t.class_names)}, target {t.rule}, "
            f"batch {d.batch_size}, patch {d.patch_size}"
            + (f", images downscaled by {d.downscale:g}" if d.downscale != 1 else "")
        )

    def train_batches(self, rank: int, start_batch: int):
        """The augmenting readers' batch stream from ``start_batch`` (see :mod:`.readers`)."""
        return make_train_loader(
            self.train_db,
            self.cfg,
            norm_spec=self.norm_spec,
            rank=rank,
            start_batch=start_batch,
            target=self.target,
        )

    def lr_factor(self, step: int) -> float:
        """1: the engine's schedule as it is."""
        return 1.0

    def loss(self, forward, batch: dict, runtime: Runtime, step: int) -> torch.Tensor:
        """Dice/cross-entropy of ``forward(batch["image"])`` against ``batch["target"]``."""
        dev = runtime.device
        image = batch["image"].to(dev, non_blocking=True)  # (N, C, P, P)
        if runtime.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        target = batch["target"].to(dev, non_blocking=True)  # (N, P, P)
        weight = batch.get("weight")
        weight = weight.to(dev, non_blocking=True) if weight is not None else None
        with runtime.autocast():
            logits = forward(image)  # (N, K, P, P)
        return self.loss_fn.to(dev)(logits.float(), target, weight)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, runtime: Runtime) -> Evaluation | None:
        """Loss and pixel metrics over the whole test database (sharded over ranks).

        Test images go through the engine's sliding window (tiles of
        ``data.test_tile_size``); their class maps keep the ignore label, which the loss and
        the confusion matrix skip. Returns ``None`` without a test database.
        """
        if self.test_db is None:
            return None
        k, dist, dev = self.target.num_classes, runtime.dist, runtime.device
        conf = torch.zeros((k, k), dtype=torch.float64)
        loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of losses, number of images)
        examples = []
        images = iter_test_images(self.test_db, self.norm_spec, self.target)
        for i, (name, image, target) in enumerate(images):
            if i % dist.world_size != dist.rank:
                continue
            with runtime.autocast():
                logits = sliding_window_logits(
                    model,
                    downscale_image(image, self.test_factor),  # (C, h, w) at the run's scale
                    tile_size=self.cfg.data.test_tile_size,
                    overlap=self.cfg.predict.overlap,
                    batch_size=self.cfg.data.batch_size,
                    device=dev,
                )  # (K, h, w)
            logits = upsample_logits(logits, image.shape[1:])  # (K, H, W)
            t = torch.as_tensor(target)
            loss = self.loss_fn.to(dev)(logits[None].to(dev).float(), t[None].to(dev))
            loss_sum += torch.tensor([float(loss), 1.0], dtype=torch.float64)
            pred = logits.argmax(0)
            conf += torch.as_tensor(
                confusion_matrix(t, pred, k, self.target.ignore_label), dtype=torch.float64
            )
            if len(examples) < self.cfg.plot_test_images:
                examples.append((name, image, target, pred.numpy()))
        stats = distributed.all_reduce_sum(torch.cat([conf.flatten(), loss_sum]).to(dev), dist)
        stats = stats.cpu()
        conf = stats[: k * k].reshape(k, k).round().long().numpy()
        pm = pixel_metrics(conf)
        metrics = {"mean_dice": pm["mean_dice"]}
        for name, pc in zip(self.target.class_names, pm["per_class"]):
            metrics[f"iou_{name}"], metrics[f"dice_{name}"] = pc["iou"], pc["dice"]
        loss = float(stats[-2] / max(stats[-1].item(), 1.0))
        return Evaluation(test_loss=loss, metrics=metrics, examples=examples)

    def checkpoint_extras(self) -> dict:
        """``normalization``, ``target`` (:meth:`TargetSpec.to_dict`), ``dataset`` (what
        ``dataset.yaml`` said, the source folder, the test images), ``input_statistics`` and
        ``scale``.

        Read by predict and export; ``input_statistics`` feeds the predict-time check of
        :func:`scarce.data.drift.unusual_statistics`, ``scale`` the downscaling of inputs.
        """
        return {
            "normalization": self.norm_spec,
            "target": self.target.to_dict(),
            "dataset": dataset_record(self.metadata, self.test_db),
            "input_statistics": self.input_statistics,
            "scale": self.scale,
        }

    def plot(self, plots_dir: Path, step: int, examples: list) -> Path | None:
        """Draw ``plots_dir/step_XXXXX.png``: each test image with truth and prediction outlines.

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
        path = Path(plots_dir) / f"step_{step:05d}.png"
        with atomic.atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=72, format="png")
        plt.close(fig)
        return path

    def _class_weights(self) -> np.ndarray | None:
        """Inverse-frequency cross-entropy weights (``loss.class_weights``), else ``None``."""
        if self.cfg.loss.class_weights != "inverse_frequency":
            return None
        t = self.target
        if t.rule == "class" or (t.rule == "semantic" and t.mask_kind == "instance"):
            counts = self.metadata["class_pixel_counts"]
        else:  # derived targets: count them on up to 32 training samples
            total = np.zeros(t.num_classes, np.int64)
            with SampleStore(self.train_db) as store:
                for i in range(min(32, len(store))):
                    derived = t.derive(store[i].mask).ravel()
                    total += np.bincount(derived, minlength=t.num_classes)[: t.num_classes]
            counts = {str(k): int(c) for k, c in enumerate(total)}
        return class_weights_from_counts(counts, t.num_classes)


def dataset_record(metadata: dict, test_db) -> dict:
    """What a model's users need to know of its training data (plain JSON values).

    ``pixel_size_um``, ``channel_names``, ``description`` (from ``dataset.yaml``), ``images``
    (the ingested folder), ``train_images`` (count) and ``test_images`` (absolute paths of
    the test split's source images, when the test database is known: the bioimage.io export
    takes its test tensors from the first).
    """
    keys = ("pixel_size_um", "channel_names", "description", "authors", "license", "cite")
    record = {k: metadata.get(k) for k in keys}
    folder = (metadata.get("source") or {}).get("images")
    record.update(images=folder, train_images=len(metadata.get("sources") or []), test_images=[])
    if test_db is not None and Path(test_db).is_dir():
        test = read_metadata(test_db)
        test_folder = Path((test.get("source") or {}).get("images") or ".")
        files = test.get("source_files") or {}
        record["test_images"] = [str(test_folder / files[s][0]) for s in sorted(files)]
    return record


def target_of(ckpt: dict) -> TargetSpec:
    """The :class:`TargetSpec` a segmentation checkpoint was trained with.

    Raises
    ------
    scarce.errors.CheckpointError
        If the checkpoint is not a segmentation model.
    """
    if ckpt.get("task", "segment") != "segment":
        raise CheckpointError(
            f"{ckpt.get('path', 'checkpoint')}: a {ckpt['task']} model, not a segmentation "
            "model; use the matching verb (e.g. scarce align)"
        )
    return TargetSpec.from_dict(ckpt["extras"]["target"])


def train(train_db, test_db, run_dir, cfg: TrainConfig | None = None, **options) -> dict:
    """Train a segmentation model and return the run summary (``scarce train``).

    Parameters
    ----------
    train_db, test_db : path-like
        See :class:`SegmentationTask`.
    run_dir : path-like
        The run folder (layout in :mod:`scarce.engine.runlog`).
    cfg : TrainConfig, optional
        On ``resume`` only ``max_steps``, ``max_minutes`` and ``early_stopping`` are read.
    **options
        ``resume`` (continue exactly from ``last.pt``), ``init_from`` (fine-tune from another
        run's weights) and ``overwrite`` (replace ``run_dir``).

    Returns
    -------
    dict
        :meth:`scarce.engine.trainer.Trainer.fit`'s summary.

    Raises
    ------
    scarce.errors.OutputExistsError
        If ``run_dir`` exists without ``resume`` or ``overwrite``.
    scarce.errors.MissingInputError
        If ``resume`` is asked and there is no ``last.pt``.
    """
    resume, overwrite = options.pop("resume", False), options.pop("overwrite", False)
    cfg, ckpt = open_run(run_dir, cfg or TrainConfig(), resume=resume, overwrite=overwrite)
    task = SegmentationTask(train_db, test_db, cfg)
    return Trainer(task, run_dir, resume_from=ckpt, overwrite=overwrite, **options).fit()

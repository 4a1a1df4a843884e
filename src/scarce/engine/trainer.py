"""Training: ``Trainer.fit()`` reads top to bottom, like nanoGPT's ``train.py``.

Each step draws a batch from the parallel readers, runs forward/backward (optionally under bf16
or fp16 autocast), clips gradients and steps AdamW with a warm-up + cosine/plateau learning
rate. Every ``test_every_n_steps`` steps the whole test database is evaluated with the
predictor's sliding window (loss, per-class IoU/Dice, data-wait fraction), ``last.pt`` is saved
and, if the test loss improved, ``best.pt``. Early stopping, ``max_steps`` and ``max_minutes``
end the run with a final evaluation and a log line that says why.

Under ``torchrun`` the model is wrapped in DistributedDataParallel; each rank reads its own
random stream, test images are sharded over ranks and the metrics summed, and only rank 0 logs
and writes.

References
----------
torch-em ``DefaultTrainer.fit`` (train, validate, save best/latest, early stop);
nnU-Net (Isensee et al. 2021, doi:10.1038/s41592-020-01008-z) for Dice+CE and the
warm-up/poly-style decay; Loshchilov & Hutter 2019 (AdamW, SGDR cosine schedule).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from scarce import distributed
from scarce.checkpoint import load_checkpoint, save_checkpoint
from scarce.config import TrainConfig, config_from_dict, config_to_dict, save_config
from scarce.evaluate import confusion_matrix, pixel_metrics
from scarce.losses import SegmentationLoss, class_weights_from_counts
from scarce.models import build_model
from scarce.normalize import normalization_spec
from scarce.predict import sliding_window_logits
from scarce.readers import StarvationMonitor, iter_test_images, make_train_loader
from scarce.runlog import RunLog
from scarce.store import read_metadata
from scarce.targets import derive_target, num_target_classes

logger = logging.getLogger("scarce")


class RunDirExistsError(FileExistsError):
    """The run folder exists and neither ``resume`` nor ``overwrite`` was given."""


def resolve_target(metadata: dict, target: str) -> str:
    """The concrete target rule: ``auto`` becomes ``class`` or ``semantic`` by mask kind."""
    if target != "auto":
        return target
    return "semantic" if metadata["mask_kind"] == "instance" else "class"


def learning_rate(step: int, cfg: TrainConfig, plateau_scale: float = 1.0) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then cosine / constant / plateau.

    Cosine decays from the peak to ``min_lr_fraction * peak`` at ``max_steps``; plateau and
    constant keep the peak times ``plateau_scale`` (cut by the trainer on plateaus).
    """
    o = cfg.optim
    peak = o.learning_rate * plateau_scale
    if o.warmup_steps > 0 and step < o.warmup_steps:
        return peak * (step + 1) / o.warmup_steps
    if o.schedule != "cosine":
        return peak
    span = max(1, cfg.max_steps - o.warmup_steps)
    t = min(1.0, (step - o.warmup_steps) / span)
    floor = o.min_lr_fraction
    return o.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


class Trainer:
    """Train a segmentation model on an LMDB training database, testing on another.

    Parameters
    ----------
    train_db, test_db : path-like
        LMDB databases written by ``scarce ingest`` (``test_db`` may be ``None``: no
        evaluation, no early stopping, ``best.pt`` = ``last.pt``).
    run_dir : path-like
        Output folder (layout in :mod:`scarce.runlog`).
    cfg : TrainConfig
        Ignored on ``resume`` except for ``max_steps``/``max_minutes``/``early_stopping``,
        which may be raised to continue a finished run.
    resume : bool
        Continue from ``run_dir/checkpoints/last.pt``: same step, optimiser and data order.
    init_from : path-like, optional
        Start from the weights of another checkpoint (fine-tuning); tensors whose shapes differ
        (e.g. another number of classes) are left at their initial values and listed.
    overwrite : bool
        Delete an existing ``run_dir`` first.

    Raises
    ------
    RunDirExistsError
        If ``run_dir`` exists (and is not empty) without ``resume`` or ``overwrite``.
    FileNotFoundError
        If ``resume`` is asked and there is no ``last.pt``.
    """

    def __init__(
        self,
        train_db,
        test_db,
        run_dir,
        cfg: TrainConfig | None = None,
        *,
        resume: bool = False,
        init_from=None,
        overwrite: bool = False,
    ):
        self.train_db, self.run_dir = Path(train_db), Path(run_dir)
        self.test_db = Path(test_db) if test_db else None
        self.resume_ckpt = None
        cfg = cfg or TrainConfig()
        if resume:
            last = self.run_dir / "checkpoints" / "last.pt"
            if not last.is_file():
                raise FileNotFoundError(f"--resume: {last} does not exist; nothing to resume")
            self.resume_ckpt = load_checkpoint(last)
            saved = config_from_dict(self.resume_ckpt["config"])
            cfg = replace(
                saved,
                max_steps=cfg.max_steps,
                max_minutes=cfg.max_minutes,
                early_stopping=cfg.early_stopping,
            )
        elif self.run_dir.exists() and any(self.run_dir.iterdir()) and not overwrite:
            raise RunDirExistsError(
                f"{self.run_dir} already exists; pass --resume to continue "
                "it or --overwrite to replace it"
            )
        self.cfg, self.init_from, self.overwrite = cfg, init_from, overwrite
        self.metadata = read_metadata(self.train_db)
        self.target = resolve_target(self.metadata, cfg.data.target)
        self.num_classes = num_target_classes(
            self.metadata, self.target, ignore_label=cfg.data.ignore_label
        )
        self.norm_spec = normalization_spec(
            cfg.data.normalization, cfg.data.percentiles, self.metadata
        )
        self.class_names = self._class_names()

    def _class_names(self) -> list[str]:
        names = self.metadata.get("class_names")
        if self.target == "boundary":
            return ["background", "interior", "boundary"]
        if self.target == "semantic":
            return ["background", "foreground"]
        if names and len(names) == self.num_classes:
            return list(names)
        return [f"class{k}" for k in range(self.num_classes)]

    # ----------------------------------------------------------------------------- set-up
    def _setup(self) -> None:
        cfg = self.cfg
        self.dist = distributed.setup(cfg.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        if self.dist.is_main:
            if self.overwrite and self.resume_ckpt is None and self.run_dir.exists():
                shutil.rmtree(self.run_dir)
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            self.log = RunLog(self.run_dir, self.class_names)
        model = build_model(
            cfg.model.name,
            self.metadata["channels"],
            self.num_classes,
            depth=cfg.model.depth,
            width=cfg.model.width,
            widths=cfg.model.widths,
            norm=cfg.model.norm,
            dropout=cfg.model.dropout,
            upsampling=cfg.model.upsampling,
        )
        if self.init_from and self.resume_ckpt is None:
            self._load_pretrained(model, self.init_from)
        self.model = model.to(self.dist.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay
        )
        self.amp = distributed.resolve_amp(cfg.amp, self.dist.device)  # off | bf16 | fp16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.step, self.plateau_scale, self.bad_evals = 0, 1.0, 0
        self.best = {"test_loss": math.inf, "step": None, "mean_dice": None}
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)
        self.ddp_model = self.model
        if self.dist.distributed:
            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)
        self.forward = torch.compile(self.ddp_model) if cfg.compile else self.ddp_model
        weights = None
        if cfg.loss.class_weights == "inverse_frequency":
            weights = torch.as_tensor(
                class_weights_from_counts(self._class_pixel_counts(), self.num_classes),
                device=self.dist.device,
            )
        self.loss_fn = SegmentationLoss(
            cfg.loss.name,
            self.num_classes,
            class_weights=weights,
            ignore_label=cfg.data.ignore_label,
        )

    def _class_pixel_counts(self) -> dict:
        if self.target == "class" or (
            self.target == "semantic" and self.metadata["mask_kind"] == "instance"
        ):
            return self.metadata["class_pixel_counts"]
        from scarce.store import SampleStore

        counts = np.zeros(self.num_classes, np.int64)
        with SampleStore(self.train_db) as store:  # estimate on up to 32 samples
            for i in range(min(32, len(store))):
                t = derive_target(
                    store[i].mask,
                    self.metadata["mask_kind"],
                    self.target,
                    self.cfg.data.boundary_width,
                )
                counts += np.bincount(t.ravel(), minlength=self.num_classes)[: self.num_classes]
        return {str(k): int(c) for k, c in enumerate(counts)}

    def _load_pretrained(self, model: torch.nn.Module, path) -> None:
        state = load_checkpoint(path)["model_state"]
        own = model.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(own) - set(usable))
        model.load_state_dict(usable, strict=False)
        logger.info(
            "Initialised from %s (%d tensors; %d kept their initial values%s)",
            path,
            len(usable),
            len(skipped),
            f": {skipped[:6]}" if skipped else "",
        )

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model_state"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        sched = ckpt["scheduler"]
        self.plateau_scale, self.bad_evals = sched["plateau_scale"], sched["bad_evals"]
        self.best = dict(ckpt["best"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        logger.info("Resumed %s at step %d", self.run_dir, self.step)

    # ---------------------------------------------------------------------------- fit
    def fit(self) -> dict:
        """Train until ``max_steps``, ``max_minutes`` or early stopping; return the summary.

        Returns
        -------
        dict
            ``steps``, ``stop_reason`` (``max_steps`` | ``max_minutes`` | ``early_stopping``),
            ``best_test_loss``, ``best_step``, ``best_mean_dice``, ``wall_time_s``,
            ``last_eval`` (the final evaluation's metrics).
        """
        self._setup()
        cfg, start = self.cfg, time.perf_counter()
        loader = make_train_loader(
            self.train_db, cfg, norm_spec=self.norm_spec, rank=self.dist.rank, start_batch=self.step
        )
        batches = StarvationMonitor(loader, threshold_ms=cfg.data.starvation_ms, logger=logger)
        self._log_start()
        train_losses, last_eval, reason = [], None, "max_steps"
        bar = self._progress_bar()
        try:
            for batch in batches:
                if self.step >= cfg.max_steps:
                    break
                if cfg.max_minutes and distributed.any_rank(
                    time.perf_counter() - start > 60 * cfg.max_minutes, self.dist
                ):
                    reason = "max_minutes"
                    break
                train_losses.append(self.train_step(batch))
                self.step += 1
                self._report_step(bar, train_losses, batches, start)
                if self.step % cfg.test_every_n_steps == 0:
                    last_eval = self.evaluate_and_save(train_losses, batches)
                    train_losses = []
                    if self._early_stop():
                        reason = "early_stopping"
                        break
        finally:
            loader.close()
            if bar is not None:
                bar.close()
        if last_eval is None or last_eval["step"] != self.step:
            last_eval = self.evaluate_and_save(train_losses, batches)
        return self._finish(reason, last_eval, time.perf_counter() - start)

    def train_step(self, batch: dict) -> float:
        """One optimiser step on ``batch``; returns the (local) training loss."""
        dev = self.dist.device
        image = batch["image"].to(dev, non_blocking=True)
        if self.cfg.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        target = batch["target"].to(dev, non_blocking=True)
        weight = batch.get("weight")
        weight = weight.to(dev, non_blocking=True) if weight is not None else None
        lr = learning_rate(self.step, self.cfg, self.plateau_scale)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with self._autocast():
            logits = self.forward(image)  # (N, K, H, W)
        loss = self.loss_fn(logits.float(), target, weight)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def _autocast(self):
        if self.amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.dist.device.type, dtype=dtype)

    # ---------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss and pixel metrics over the whole test database (sharded over ranks).

        Returns
        -------
        dict
            ``test_loss`` (mean over images), ``pixel_metrics`` (see
            :func:`scarce.evaluate.pixel_metrics`), ``examples`` (rank 0: up to
            ``plot_test_images`` tuples (name, image, truth, prediction) for plots).
        """
        self.model.eval()
        k = self.num_classes
        conf = torch.zeros((k, k), dtype=torch.float64)
        loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of losses, number of images)
        examples = []
        tile = self.cfg.data.test_tile_size
        for i, (name, image, target) in enumerate(
            iter_test_images(
                self.test_db,
                self.norm_spec,
                target=self.target,
                boundary_width=self.cfg.data.boundary_width,
            )
        ):
            if i % self.dist.world_size != self.dist.rank:
                continue
            with self._autocast():
                logits = sliding_window_logits(
                    self.model,
                    image,
                    tile_size=tile,
                    overlap=self.cfg.predict.overlap,
                    batch_size=self.cfg.data.batch_size,
                    device=self.dist.device,
                )  # (K, H, W)
            t = torch.as_tensor(target)
            dev = self.dist.device
            loss = self.loss_fn(logits[None].to(dev).float(), t[None].to(dev))
            loss_sum += torch.tensor([float(loss), 1.0], dtype=torch.float64)
            pred = logits.argmax(0)
            conf += torch.as_tensor(
                confusion_matrix(t, pred, k, self.cfg.data.ignore_label), dtype=torch.float64
            )
            if len(examples) < self.cfg.plot_test_images:
                examples.append((name, image, target, pred.numpy()))
        stats = torch.cat([conf.flatten(), loss_sum]).to(self.dist.device)
        stats = distributed.all_reduce_sum(stats, self.dist).cpu()
        conf = stats[: k * k].reshape(k, k).round().long().numpy()
        loss = float(stats[-2] / max(stats[-1].item(), 1.0))
        return {"test_loss": loss, "pixel_metrics": pixel_metrics(conf), "examples": examples}

    def evaluate_and_save(self, train_losses: list[float], batches: StarvationMonitor) -> dict:
        """Evaluate, log a metrics row, save ``last.pt`` (and ``best.pt`` if improved)."""
        wait = batches.wait_fraction(reset=True)
        if self.test_db is None:
            ev = {
                "test_loss": float(np.mean(train_losses)) if train_losses else math.nan,
                "pixel_metrics": None,
                "examples": [],
            }
        else:
            ev = self.evaluate()
        improved = ev["test_loss"] < self.best["test_loss"]
        pm = ev["pixel_metrics"]
        if improved:
            self.best = {
                "test_loss": ev["test_loss"],
                "step": self.step,
                "mean_dice": pm["mean_dice"] if pm else None,
            }
            self.bad_evals = 0
        else:
            self.bad_evals += 1
            if (
                self.cfg.optim.schedule == "plateau"
                and self.bad_evals % self.cfg.optim.plateau_patience == 0
            ):
                self.plateau_scale *= self.cfg.optim.plateau_factor
                logger.info("Plateau: learning rate scaled to %.3g x peak", self.plateau_scale)
        row = self._metrics_row(train_losses, ev, wait)
        if self.dist.is_main:
            self.log.evaluation(row)
            self.log.plot_predictions(self.step, ev["examples"])
            state = self._state()
            save_checkpoint(self.run_dir / "checkpoints" / "last.pt", state)
            if improved or self.test_db is None:
                save_checkpoint(self.run_dir / "checkpoints" / "best.pt", state)
            logger.info(
                "step %d: train loss %.4f, test loss %.4f%s, mean Dice %s, data wait %.1f%%%s",
                self.step,
                row["train_loss"] or math.nan,
                ev["test_loss"],
                " (best)" if improved else "",
                _f(row["mean_dice"]),
                100 * wait,
                "" if improved else f", {self.bad_evals} evaluation(s) without improvement",
            )
        return row

    def _metrics_row(self, train_losses, ev, wait) -> dict:
        pm = ev["pixel_metrics"]
        row = {
            "step": self.step,
            "time_s": round(time.time() - self._t0, 2),
            "train_loss": float(np.mean(train_losses)) if train_losses else None,
            "test_loss": ev["test_loss"],
            "lr": learning_rate(max(self.step - 1, 0), self.cfg, self.plateau_scale),
            "data_wait_pct": 100.0 * wait,
            "mean_dice": pm["mean_dice"] if pm else None,
        }
        for name, pc in zip(self.class_names, pm["per_class"] if pm else []):
            row[f"iou_{name}"], row[f"dice_{name}"] = pc["iou"], pc["dice"]
        return row

    def _early_stop(self) -> bool:
        n = self.cfg.early_stopping
        if n <= 0 or self.test_db is None or self.bad_evals < n:
            return False
        logger.warning(
            "Early stopping at step %d: the test loss has not improved for %d evaluations "
            "(every %d steps); best %.4f at step %s. Raise --early-stopping or set it to 0 to "
            "train longer.",
            self.step,
            self.bad_evals,
            self.cfg.test_every_n_steps,
            self.best["test_loss"],
            self.best["step"],
        )
        return True

    def _state(self) -> dict:
        m = self.model
        return {
            "model": {
                "name": self.cfg.model.name,
                "in_channels": m.in_channels,
                "num_classes": m.num_classes,
                "options": dict(m.options),
            },
            "model_state": {k: v.detach().cpu() for k, v in m.state_dict().items()},
            "config": config_to_dict(self.cfg),
            "normalization": self.norm_spec,
            "class_names": self.class_names,
            "mask_kind": self.metadata["mask_kind"],
            "target": self.target,
            "ignore_label": self.cfg.data.ignore_label,
            "step": self.step,
            "best": dict(self.best),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": {"plateau_scale": self.plateau_scale, "bad_evals": self.bad_evals},
            "rng": {"torch": torch.get_rng_state()},
        }

    # ------------------------------------------------------------------------- reporting
    def _log_start(self) -> None:
        self._t0 = time.time()
        if not self.dist.is_main:
            return
        cfg, m = self.cfg, self.model
        logger.info(
            "Training %s (%d parameters, receptive field %d px) on %s: %d classes %s, "
            "target %s, %d process(es) x batch %d, patch %d, device %s, mixed precision %s%s",
            cfg.model.name,
            sum(p.numel() for p in m.parameters()),
            getattr(m, "receptive_field", -1),
            self.train_db,
            self.num_classes,
            self.class_names,
            self.target,
            self.dist.world_size,
            cfg.data.batch_size,
            cfg.data.patch_size,
            self.dist.device,
            self.amp,
            " (amp: auto)" if cfg.amp == "auto" else "",
        )

    def _progress_bar(self):
        if not self.dist.is_main or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True)

    def _report_step(self, bar, losses, batches, start) -> None:
        if not self.dist.is_main or self.step % self.cfg.log_every_n_steps:
            return
        n = self.cfg.log_every_n_steps
        rate = (
            self.cfg.data.batch_size
            * self.dist.world_size
            * self.step
            / max(time.perf_counter() - start, 1e-9)
        )
        loss = float(np.mean(losses[-n:])) if losses else math.nan
        wait = 100 * batches.wait_fraction(reset=False)
        if self.log is not None:
            self.log.scalar("train/loss", loss, self.step)
        if bar is not None:
            bar.n = self.step
            bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.1f}", wait=f"{wait:.0f}%")
        else:
            logger.info(
                "step %d/%d loss %.4f, %.1f samples/s, data wait %.0f%%",
                self.step,
                self.cfg.max_steps,
                loss,
                rate,
                wait,
            )

    def _finish(self, reason: str, last_eval: dict, wall: float) -> dict:
        summary = {
            "steps": self.step,
            "stop_reason": reason,
            "wall_time_s": round(wall, 1),
            "best_test_loss": self.best["test_loss"],
            "best_step": self.best["step"],
            "best_mean_dice": self.best["mean_dice"],
            "last_eval": last_eval,
            "world_size": self.dist.world_size,
            "amp": self.amp,
        }
        if self.dist.is_main:
            why = {
                "max_steps": f"reached max_steps = {self.cfg.max_steps}",
                "max_minutes": f"time budget of {self.cfg.max_minutes} minutes used",
                "early_stopping": "early stopping",
            }[reason]
            logger.info(
                "Run ended at step %d (%s) after %.0f s; best test loss %.4f at step %s;"
                " checkpoints in %s",
                self.step,
                why,
                wall,
                self.best["test_loss"],
                self.best["step"],
                self.run_dir / "checkpoints",
            )
            self.log.summary(summary)
            self.log.close()
        distributed.cleanup()
        return summary

    log: RunLog | None = None


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def train(train_db, test_db, run_dir, cfg: TrainConfig | None = None, **kwargs) -> dict:
    """Train and return the run summary: ``Trainer(...).fit()`` in one call.

    See :class:`Trainer` for the parameters and errors.
    """
    return Trainer(train_db, test_db, run_dir, cfg, **kwargs).fit()

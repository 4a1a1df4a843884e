"""The training engine: ``Trainer.fit()`` reads top to bottom, like nanoGPT's ``train.py``.

The trainer is *given* a task (torch-em's ``DefaultTrainer`` is given its parts): the task
supplies the model, its training batches, the loss of one batch, its evaluation, its metrics
columns, what it adds to a checkpoint and its plots (:class:`Task`). The engine owns what every
task needs: the optimiser and learning-rate schedule, mixed precision, DDP, the run folder,
checkpoints and exact resume, early stopping, the time budget and progress.

Each step draws a batch from the task's readers, computes the task's loss (under bf16 or fp16
autocast when asked) on ``grad_accumulation`` micro-batches, clips gradients and steps AdamW. A
CUDA out-of-memory error in the first ``OOM_FALLBACK_STEPS`` steps halves the micro-batch
(doubling ``grad_accumulation``, so the global batch and the data stay the same), is logged once
and recorded in ``summary.json`` (``oom_fallback``), and training continues. Every
``test_every_n_steps`` steps the task evaluates, ``last.pt`` is saved and, if the test loss
improved, ``best.pt``. Early stopping, ``max_steps``, ``max_minutes`` or the task itself (e.g.
an aligner that collapsed) end the run with a final evaluation and a log line that says why.
Under ``torchrun`` the model is wrapped in DistributedDataParallel; only rank 0 logs and writes.

SIGTERM, SIGINT or SIGUSR1 (:class:`scarce.lifecycle.GracefulStop`) end the run after the
current step without an evaluation: ``last.pt`` is saved and ``summary.json`` says
``stop_reason: signal``; every rank of a DDP run stops at the same step (the stop flag travels
with the time-budget flag in one all-reduce per step). ``--resume`` continues exactly. A kill
loses at most the steps since the last checkpoint; the temporary files of a killed run are
swept when the next one starts. A rank that dies makes the others raise
:class:`~scarce.errors.PeerLostError` naming it (:class:`~scarce.engine.distributed.PeerWatch`).

References
----------
torch-em ``DefaultTrainer.fit`` (train, validate, save best/latest, early stop); nanoGPT
``train.py`` (a loop that reads top to bottom, DDP, self-describing checkpoints).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from scarce import atomic
from scarce.config import config_to_dict, save_config
from scarce.data.monitor import StarvationMonitor
from scarce.engine import distributed
from scarce.engine.accumulate import fallback_event, split_batch
from scarce.engine.checkpoint import load_matching_weights, save_checkpoint, sweep_checkpoints
from scarce.engine.probe import PeakMemory
from scarce.engine.runlog import RunLog, StepProgress, stop_reason_text
from scarce.engine.schedule import learning_rate
from scarce.engine.task import Evaluation, Runtime, Task
from scarce.lifecycle import GracefulStop

logger = logging.getLogger("scarce")


class Trainer:
    """Train a task's model, evaluating, checkpointing and logging into a run folder.

    Parameters
    ----------
    task : Task
        Segmentation (:class:`scarce.segment.task.SegmentationTask`) or alignment.
    run_dir : path-like
        Output folder (layout in :mod:`scarce.engine.runlog`).
    resume_from : dict, optional
        The checkpoint to continue (from :func:`open_run`): same step, optimiser state and
        data order.
    init_from : path-like, optional
        Start from the weights of another checkpoint or run (fine-tuning); tensors whose
        shapes differ (e.g. another number of classes) keep their initial values.
    overwrite : bool
        Delete an existing ``run_dir`` first (rank 0).
    """

    log: RunLog | None = None

    def __init__(self, task: Task, run_dir, *, resume_from=None, init_from=None, overwrite=False):
        self.task, self.cfg, self.run_dir = task, task.cfg, Path(run_dir)
        self.resume_ckpt, self.init_from, self.overwrite = resume_from, init_from, overwrite
        resumed_from = (resume_from or {}).get("init_from")
        self.lineage = str(Path(init_from).resolve()) if init_from else resumed_from

    def _setup(self) -> None:
        cfg = self.cfg
        dist = distributed.setup(cfg.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        if dist.is_main:
            if self.overwrite and self.resume_ckpt is None and self.run_dir.exists():
                shutil.rmtree(self.run_dir)
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            self._sweep()
            save_config(cfg, self.run_dir / "config.yaml")
            self.log = RunLog(self.run_dir, self.task.columns, self.task.headline)
            if self.resume_ckpt is not None:
                self.log.keep_until(int(self.resume_ckpt["step"]))
        model = self.task.build_model()
        if self.init_from and self.resume_ckpt is None:
            load_matching_weights(model, self.init_from)
        self.model = model.to(dist.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay
        )
        amp = distributed.resolve_amp(cfg.amp, dist.device)  # off | bf16 | fp16
        self.runtime = Runtime(dist, amp, cfg.channels_last)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        self.step, self.plateau_scale, self.bad_evals = 0, 1.0, 0
        self.oom_fallback: dict | None = None
        self.memory = PeakMemory(dist.device)
        self.best = {"test_loss": math.inf, "step": None, self.task.headline: None}
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)
        forward = self.ddp = self.model
        if dist.distributed:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            forward = self.ddp = DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=self.task.partial_forward
            )
        self.forward = torch.compile(forward) if cfg.compile else forward

    def _sweep(self) -> None:
        """Remove what a killed run left in the run folder (temporary files; logged)."""
        sweep_checkpoints(self.run_dir / "checkpoints")
        atomic.sweep_stale(self.run_dir)
        atomic.sweep_stale(self.run_dir / "plots")

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model_state"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.plateau_scale = ckpt["scheduler"]["plateau_scale"]
        self.bad_evals = ckpt["scheduler"]["bad_evals"]
        self.best = dict(ckpt["best"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        logger.info("Resumed %s at step %d", self.run_dir, self.step)

    # ------------------------------------------------------------------------------ fit
    def fit(self) -> dict:
        """Train until ``max_steps``, ``max_minutes``, early stopping or the task's stop.

        Returns
        -------
        dict
            ``task``, ``steps``, ``stop_reason`` (``max_steps`` | ``max_minutes`` |
            ``early_stopping`` | ``signal`` | a task's reason), ``signal`` (its name, e.g.
            ``"SIGTERM"``, else ``None``), ``wall_time_s``, ``best_test_loss``, ``best_step``,
            ``best_<headline>``, ``last_eval`` (the final metrics row, ``None`` after a
            signal), ``world_size``, ``amp``.

        Raises
        ------
        scarce.errors.PeerLostError
            Under DDP, when another rank died (names it).
        """
        self._setup()
        self._stop = GracefulStop()
        with self._stop, distributed.PeerWatch(self.runtime.dist) as peers:
            try:
                return self._fit()
            except Exception as exc:
                lost = peers.error(exc)
                if lost is not None:
                    raise lost from exc
                raise

    def _fit(self) -> dict:
        cfg, start = self.cfg, time.perf_counter()
        stream = self.task.train_batches(self.runtime.dist.rank, start_batch=self.step)
        batches = StarvationMonitor(stream, threshold_ms=cfg.data.starvation_ms, logger=logger)
        self._log_start()
        self.memory.reset()
        train_losses, last_eval, reason = [], None, "max_steps"
        progress = StepProgress(
            self.log if self.runtime.dist.is_main else None,
            max_steps=cfg.max_steps,
            initial=self.step,
            every=cfg.log_every_n_steps,
            samples_per_step=self.task.samples_per_batch * self.runtime.dist.world_size,
        )
        stream_of = iter(batches)
        try:
            while self.step < cfg.max_steps:
                reason = self._should_stop(time.perf_counter() - start) or reason
                if reason in ("max_minutes", "signal"):
                    break  # before asking the readers for a batch it would not use
                train_losses.append(self.train_step(next(stream_of)))
                self.step += 1
                progress.update(self.step, train_losses, batches.wait_fraction(reset=False))
                if self.step % cfg.test_every_n_steps == 0:
                    last_eval, stop = self.evaluate_and_save(train_losses, batches)
                    train_losses = []
                    if stop:
                        reason = stop
                        break
        finally:
            stream.close()
            progress.close()
        if reason == "signal":
            self._save_on_signal()
            last_eval = None
        elif last_eval is None or last_eval["step"] != self.step:
            last_eval, _ = self.evaluate_and_save(train_losses, batches)
        return self._finish(reason, last_eval, time.perf_counter() - start)

    def _should_stop(self, elapsed: float) -> str | None:
        """``"signal"`` or ``"max_minutes"`` when any rank must stop before the next step."""
        time_up = bool(self.cfg.max_minutes) and elapsed > 60 * self.cfg.max_minutes
        if not self.runtime.dist.distributed and not (time_up or self._stop.requested):
            return None  # single process: no collective needed
        signalled, time_up = distributed.any_rank(
            self._stop.requested, time_up, info=self.runtime.dist
        )
        return "signal" if signalled else ("max_minutes" if time_up else None)

    def _save_on_signal(self) -> None:
        """Save ``last.pt`` at the current step, without an evaluation (rank 0)."""
        if not self.runtime.dist.is_main:
            return
        path = save_checkpoint(self.run_dir / "checkpoints" / "last.pt", self._state())
        logger.warning(
            "Stopped by %s after step %d: saved %s; continue with --resume",
            self._stop.name or "a signal on another rank",
            self.step,
            path,
        )

    def train_step(self, batch: dict) -> float:
        """One optimiser step on ``batch``; returns the (local) training loss.

        Raises
        ------
        torch.OutOfMemoryError
            When memory runs out after the first ``OOM_FALLBACK_STEPS`` steps, with micro-batches
            of one sample, or under DDP (ranks must agree on the micro-batches).
        """
        while True:
            try:
                return self._optimizer_step(batch)
            except torch.OutOfMemoryError:
                if not self._halve_micro_batch(batch):
                    raise

    def _optimizer_step(self, batch: dict) -> float:
        lr = learning_rate(self.step, self.cfg, self.plateau_scale) * self.task.lr_factor(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        parts = split_batch(batch, self.cfg.grad_accumulation)
        total, n = 0.0, sum(size for size, _ in parts)
        for i, (size, part) in enumerate(parts):
            last = i == len(parts) - 1
            no_sync = getattr(self.ddp, "no_sync", None)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                loss = self.task.loss(self.forward, part, self.runtime, self.step) * (size / n)
                self.scaler.scale(loss).backward()
            total += float(loss.detach())
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total

    def _halve_micro_batch(self, batch: dict) -> bool:
        """After an out-of-memory error: double ``grad_accumulation`` if allowed; say so once."""
        event = fallback_event(
            split_batch(batch, 1)[0][0],
            self.cfg.grad_accumulation,
            self.step,
            distributed=self.runtime.dist.distributed,
            first=self.oom_fallback is None,
        )
        if event is None:
            return False
        self.optimizer.zero_grad(set_to_none=True)
        if self.runtime.device.type == "cuda":
            torch.cuda.empty_cache()
        self.cfg = replace(self.cfg, grad_accumulation=event["grad_accumulation"])
        self.task.cfg = self.cfg
        self.oom_fallback = event
        if self.runtime.dist.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
        return True

    # ------------------------------------------------------------------------ evaluation
    def evaluate_and_save(self, train_losses: list[float], batches) -> tuple[dict, str | None]:
        """Evaluate, log a metrics row, save ``last.pt`` (and ``best.pt`` if improved).

        Returns
        -------
        row : dict
            The ``metrics.csv`` row.
        stop : str or None
            Why the run must end now (early stopping or the task's reason), else ``None``.
        """
        wait = batches.wait_fraction(reset=True)
        self.model.eval()
        ev = self.task.evaluate(self.model, self.runtime)
        tested = ev is not None
        if not tested:  # no test set: the training loss stands in
            mean = float(np.mean(train_losses)) if train_losses else math.nan
            ev = Evaluation(test_loss=mean)
        improved = ev.test_loss < self.best["test_loss"]
        headline = self.task.headline
        if improved:
            self.best = {"test_loss": ev.test_loss, "step": self.step, headline: None}
            self.best[headline] = ev.metrics.get(headline)
            self.bad_evals = 0
        else:
            self._count_bad_evaluation()
        last = max(self.step - 1, 0)
        row = {
            "step": self.step,
            "time_s": round(time.time() - self._t0, 2),
            "train_loss": float(np.mean(train_losses)) if train_losses else None,
            "test_loss": ev.test_loss,
            **ev.metrics,
            "lr": learning_rate(last, self.cfg, self.plateau_scale) * self.task.lr_factor(last),
            "data_wait_pct": 100.0 * wait,
        }
        if self.runtime.dist.is_main:
            self.log.evaluation(row)
            self.task.plot(self.log.plots_dir, self.step, ev.examples)
            state = self._state()
            save_checkpoint(self.run_dir / "checkpoints" / "last.pt", state)
            if improved or not tested:
                save_checkpoint(self.run_dir / "checkpoints" / "best.pt", state)
            logger.info(
                "step %d: train loss %.4f, test loss %.4f%s, %s %s, data wait %.1f%%%s",
                self.step,
                row["train_loss"] or math.nan,
                ev.test_loss,
                " (best)" if improved else "",
                headline,
                _fmt(row.get(headline)),
                100 * wait,
                "" if improved else f", {self.bad_evals} evaluation(s) without improvement",
            )
        return row, ev.stop or self._early_stop(tested)

    def _count_bad_evaluation(self) -> None:
        self.bad_evals += 1
        optim = self.cfg.optim
        if optim.schedule == "plateau" and self.bad_evals % optim.plateau_patience == 0:
            self.plateau_scale *= optim.plateau_factor
            logger.info("Plateau: learning rate scaled to %.3g x peak", self.plateau_scale)

    def _early_stop(self, tested: bool) -> str | None:
        n = self.cfg.early_stopping
        if n <= 0 or not tested or self.bad_evals < n:
            return None
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
        return "early_stopping"

    def _state(self) -> dict:
        return {
            "task": self.task.name,
            "model": {"name": self.cfg.model.name, "arguments": dict(self.model.arguments)},
            "model_state": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "config": config_to_dict(self.cfg),
            "extras": self.task.checkpoint_extras(),
            "step": self.step,
            "best": dict(self.best),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": {"plateau_scale": self.plateau_scale, "bad_evals": self.bad_evals},
            "rng": {"torch": torch.get_rng_state()},
            "init_from": self.lineage,
        }

    # ------------------------------------------------------------------------- reporting
    def _log_start(self) -> None:
        self._t0 = time.time()
        if not self.runtime.dist.is_main:
            return
        m, rt = self.model, self.runtime
        logger.info(
            "Training %s (%d parameters, receptive field %d px): %s; %d process(es), "
            "device %s, mixed precision %s%s",
            self.cfg.model.name,
            sum(p.numel() for p in m.parameters()),
            getattr(m, "receptive_field", -1),
            self.task.describe(),
            rt.dist.world_size,
            rt.device,
            rt.amp,
            " (amp: auto)" if self.cfg.amp == "auto" else "",
        )

    def _finish(self, reason: str, last_eval: dict, wall: float) -> dict:
        headline = self.task.headline
        summary = {
            "task": self.task.name,
            "steps": self.step,
            "stop_reason": reason,
            "signal": self._stop.name if reason == "signal" else None,
            "wall_time_s": round(wall, 1),
            "best_test_loss": self.best["test_loss"],
            "best_step": self.best["step"],
            f"best_{headline}": self.best.get(headline),
            "headline": headline,
            "init_from": self.lineage,
            "last_eval": last_eval,
            "world_size": self.runtime.dist.world_size,
            "amp": self.runtime.amp,
            "peak_memory_bytes": self.memory.peak(),
            "oom_fallback": self.oom_fallback,
        }
        if self.runtime.dist.is_main:
            logger.info(
                "Run ended at step %d (%s) after %.0f s; best test loss %.4f at step %s;"
                " checkpoints in %s",
                *(self.step, stop_reason_text(reason, self.cfg), wall, self.best["test_loss"]),
                *(self.best["step"], self.run_dir / "checkpoints"),
            )
            self.log.summary(summary)
            self.log.close()
        distributed.cleanup()
        return summary


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"

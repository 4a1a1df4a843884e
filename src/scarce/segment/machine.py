"""Measuring a segmentation run's building blocks on this machine, for the run plan.

A :class:`Candidate` is one sizing of a run (downscale, patch, batch, width, depth, mixed
precision). :class:`LocalMachine` measures, for a candidate, the wall time and peak memory of
one training step (the real network, loss and AdamW on random data of the candidate's shape),
of one forward pass over test tiles, and the rate of one reader worker on the real training
database. :mod:`scarce.segment.plan` only talks to the :class:`Machine` protocol, so tests give
it a fake machine with known costs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch

from scarce.config import TrainConfig
from scarce.data.monitor import measure_batches
from scarce.data.store import read_metadata
from scarce.engine.distributed import resolve_device
from scarce.engine.probe import PeakMemory, current_rss, machine_facts, time_calls
from scarce.models import build_model
from scarce.segment.losses import SegmentationLoss
from scarce.segment.readers import make_train_loader, normalization_spec_for
from scarce.segment.targets import resolve_target


@dataclass(frozen=True, order=True)
class Candidate:
    """One sizing of a training run.

    Attributes
    ----------
    downscale : float
        Images shrunk by this factor (``data.downscale``).
    patch : int
        Training patch side at the working scale, pixels.
    batch : int
        Patches per step.
    width, depth : int
        U-Net base width (channels) and number of poolings.
    amp : {"off", "bf16", "fp16"}
        Mixed precision.
    """

    downscale: float
    patch: int
    batch: int
    width: int
    depth: int
    amp: str

    @classmethod
    def of(cls, cfg: TrainConfig, amp: str | None = None) -> Candidate:
        """The sizes of a config (``amp``: the resolved precision, default ``cfg.amp``)."""
        d, m = cfg.data, cfg.model
        return cls(float(d.downscale), d.patch_size, d.batch_size, m.width, m.depth, amp or cfg.amp)

    @property
    def pixels(self) -> int:
        """Pixels per step: batch x patch x patch."""
        return self.batch * self.patch * self.patch


@dataclass(frozen=True)
class Timing:
    """Seconds per call, and how far the calls raised the process's peak memory (bytes)."""

    seconds: float
    peak_bytes: int


@dataclass(frozen=True)
class ReaderRate:
    """One reader worker: batches per second, start-up until the first batch (s)."""

    batches_per_second: float
    startup_seconds: float


class Machine(Protocol):
    """What the plan measures; :class:`LocalMachine` measures it, tests fake it.

    Attributes
    ----------
    facts : dict
        :func:`scarce.engine.probe.machine_facts`.
    base_bytes : int
        Memory the training process holds before its model exists, bytes (CPU: RSS; CUDA: 0).
    """

    facts: dict
    base_bytes: int

    def step(self, c: Candidate) -> Timing:
        """One training step of ``c`` (forward, loss, backward, clipping, AdamW)."""

    def forward(self, c: Candidate, tile: int) -> Timing:
        """One inference forward pass of ``c.batch`` tiles of ``tile`` x ``tile`` pixels."""

    def readers(self, c: Candidate) -> ReaderRate:
        """One reader worker drawing ``c``'s batches from the training database."""


class LocalMachine:
    """Measure candidates on this machine with the database's channels and classes.

    Parameters
    ----------
    train_db : path-like
        The training LMDB (read by the reader probe).
    cfg : TrainConfig
        The recipe (model name and norm, loss, augmentation, normalisation, target, threads).
    device : torch.device
        Where training will run.
    warmup, repeats : int
        Untimed and timed calls per measurement (median of the timed ones).
    reader_seconds : float
        Measuring time of the reader probe, seconds.
    """

    def __init__(
        self, train_db, cfg: TrainConfig, device, *, warmup=1, repeats=2, reader_seconds=2.0
    ):
        self.train_db, self.cfg = train_db, cfg
        self.device = resolve_device(device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.facts = machine_facts(self.device)
        meta = read_metadata(train_db)
        self.in_channels = int(meta["channels"])
        self.target = resolve_target(
            meta,
            cfg.data.target,
            boundary_width=cfg.data.boundary_width,
            ignore_label=cfg.data.ignore_label,
        )
        self.norm_spec = normalization_spec_for(train_db, cfg)  # robust: floor from the images
        self.warmup, self.repeats, self.reader_seconds = warmup, repeats, reader_seconds
        self.base_bytes = current_rss() if self.device.type != "cuda" else 0
        self.memory = PeakMemory(self.device)

    def _model(self, c: Candidate) -> torch.nn.Module:
        m = self.cfg.model
        model = build_model(
            m.name,
            self.in_channels,
            self.target.num_classes,
            depth=c.depth,
            width=c.width,
            norm=m.norm,
            dropout=m.dropout,
            upsampling=m.upsampling,
        )
        return model.to(self.device)

    def _autocast(self, amp: str):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def step(self, c: Candidate) -> Timing:
        """Time full training steps of ``c`` on random data; peak memory of the process."""
        self._release()
        rng = np.random.default_rng(0)
        model = self._model(c).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_fn = SegmentationLoss(self.cfg.loss.name, self.target.num_classes).to(self.device)
        scaler = torch.amp.GradScaler("cuda", enabled=c.amp == "fp16")
        shape = (c.batch, self.in_channels, c.patch, c.patch)
        image = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(self.device)
        labels = rng.integers(0, self.target.num_classes, (c.batch, c.patch, c.patch))
        target = torch.from_numpy(labels).to(self.device)

        def one_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with self._autocast(c.amp):
                logits = model(image)
            scaler.scale(loss_fn(logits.float(), target)).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
            scaler.step(optimizer)
            scaler.update()

        self.memory.reset()
        seconds = time_calls(one_step, warmup=self.warmup, repeats=self.repeats, device=self.device)
        return Timing(seconds, self.memory.increase())

    @torch.no_grad()
    def forward(self, c: Candidate, tile: int) -> Timing:
        """Time inference of ``c.batch`` tiles (evaluation runs tiles in batches of ``batch``)."""
        self._release()
        model = self._model(c).eval()
        x = torch.zeros((c.batch, self.in_channels, tile, tile), device=self.device)

        def run() -> None:
            with torch.inference_mode(), self._autocast(c.amp):
                model(x)

        self.memory.reset()
        seconds = time_calls(run, warmup=1, repeats=self.repeats, device=self.device)
        return Timing(seconds, self.memory.increase())

    def readers(self, c: Candidate) -> ReaderRate:
        """Start one reader worker on the training database and measure its batches/s."""
        data = replace(
            self.cfg.data,
            patch_size=c.patch,
            batch_size=c.batch,
            reader_count=1,
            downscale=c.downscale,
        )
        cfg = replace(self.cfg, data=data)
        start = time.perf_counter()
        with make_train_loader(
            self.train_db, cfg, norm_spec=self.norm_spec, target=self.target
        ) as batches:
            next(batches)
            startup = time.perf_counter() - start
            result = measure_batches(
                batches, seconds=self.reader_seconds, warmup_batches=1, batch_size=c.batch
            )
        return ReaderRate(result["batches_per_second"], startup)

    def _release(self) -> None:
        """Hand the previous probe's cached CUDA blocks back (CPU: nothing to do)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


__all__ = ["Candidate", "LocalMachine", "Machine", "ReaderRate", "Timing"]

"""The engine/task interface: what :class:`~scarce.engine.trainer.Trainer` is given.

A task (segmentation, alignment) is any object with the attributes and methods of
:class:`Task`, a ``typing.Protocol``: no base class, no callbacks, no configuration by
subclassing. :class:`Runtime` tells the task where and how it computes; :class:`Evaluation` is
what its evaluation returns.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from scarce.engine import distributed


@dataclass(frozen=True)
class Runtime:
    """Where and how the current process computes; handed to the task's loss and evaluation.

    Attributes
    ----------
    dist : scarce.engine.distributed.DistInfo
        Rank, world size and device.
    amp : {"off", "bf16", "fp16"}
        The resolved mixed-precision mode.
    channels_last : bool
        Whether images should be NHWC in memory.
    """

    dist: distributed.DistInfo
    amp: str = "off"
    channels_last: bool = False

    @property
    def device(self) -> torch.device:
        """The device this process computes on."""
        return self.dist.device

    def autocast(self):
        """A context that runs the forward pass in the mixed precision of :attr:`amp`."""
        if self.amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


@dataclass
class Evaluation:
    """What a task's evaluation returns.

    Attributes
    ----------
    test_loss : float
        The loss the engine early-stops on (mean over the test set, summed over ranks).
    metrics : dict of str to float or None
        One value per column of :attr:`Task.columns`.
    examples : list
        What :meth:`Task.plot` draws (rank 0; may be empty).
    stop : str or None
        A stop reason when the task wants the run to end now (e.g. ``"collapse"``).
    """

    test_loss: float
    metrics: dict[str, float | None] = field(default_factory=dict)
    examples: list = field(default_factory=list)
    stop: str | None = None


class Task(Protocol):
    """What :class:`Trainer` is given: everything that differs between segmentation and alignment.

    Attributes
    ----------
    name : str
        Recorded in checkpoints and ``summary.json`` (``"segment"``, ``"align"``).
    cfg : EngineConfig subclass
        The run's config; the engine reads the :class:`~scarce.config.EngineConfig` fields
        and ``data.starvation_ms``.
    columns : tuple of str
        ``metrics.csv`` columns the task adds after ``test_loss``.
    headline : str
        The column logged at each evaluation and kept as ``best_<headline>``.
    samples_per_batch : int
        Samples per training batch and process (for the samples/s rate).
    partial_forward : bool
        Some parameters take no part in some steps (staged training): DDP must look for
        unused parameters.
    """

    name: str
    cfg: Any
    columns: tuple[str, ...]
    headline: str
    samples_per_batch: int
    partial_forward: bool

    def build_model(self) -> torch.nn.Module:
        """A new network on the CPU, in float32 (its registry name is ``cfg.model.name``)."""

    def describe(self) -> str:
        """One line for the start of the log: data, target, model facts."""

    def train_batches(self, rank: int, start_batch: int):
        """An iterator over training batches from ``start_batch``, with ``close()``."""

    def loss(self, forward, batch: dict, runtime: Runtime, step: int) -> torch.Tensor:
        """The scalar float32 loss of ``batch`` through ``forward`` (the model, maybe DDP) at
        optimiser step ``step`` (staged tasks open parts of the model by step)."""

    def lr_factor(self, step: int) -> float:
        """The task's factor on the engine's learning rate at ``step`` (1 for most tasks)."""

    def evaluate(self, model: torch.nn.Module, runtime: Runtime) -> Evaluation | None:
        """Evaluate ``model`` (in eval mode) on the test set, sharded over ranks and summed;
        ``None`` when there is no test set (the engine then tracks the training loss)."""

    def checkpoint_extras(self) -> dict:
        """Plain values stored as ``extras`` in every checkpoint."""

    def plot(self, plots_dir: Path, step: int, examples: list) -> None:
        """Draw ``plots_dir/step_XXXXX.png`` from the evaluation's examples (rank 0)."""

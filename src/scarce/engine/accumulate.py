"""Gradient accumulation: micro-batches of a batch, and the out-of-memory fallback.

A step may run its batch as ``grad_accumulation`` micro-batches (:func:`split_batch`; the
trainer scales each micro-batch's loss by its share of the batch, so the gradient is the
batch's). When a CUDA out-of-memory error happens in the first :data:`OOM_FALLBACK_STEPS`
steps, :func:`fallback_event` doubles the number of micro-batches (the batch, and so the data
and the result up to float rounding, stay the same) and the trainer retries the step.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger("scarce")

OOM_FALLBACK_STEPS = 20  # an out-of-memory error before this step halves the micro-batch

__all__ = ["OOM_FALLBACK_STEPS", "fallback_event", "split_batch"]


def split_batch(batch: dict, parts: int) -> list[tuple[int, dict]]:
    """Split a batch into ``parts`` micro-batches along the first axis of its tensors.

    Parameters
    ----------
    batch : dict
        Tensors whose first axis is the batch ``(N, ...)`` (other values go to every part).
    parts : int
        Number of micro-batches (at most N; sizes differ by at most one).

    Returns
    -------
    list of (int, dict)
        The size of each micro-batch and its batch.
    """
    n = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim)
    bounds = np.linspace(0, n, max(1, min(parts, n)) + 1).astype(int).tolist()

    def cut(v, a, b):
        return v[a:b] if isinstance(v, torch.Tensor) and v.ndim and len(v) == n else v

    return [
        (b - a, {k: cut(v, a, b) for k, v in batch.items()}) for a, b in zip(bounds, bounds[1:])
    ]


def fallback_event(
    batch: int, accumulation: int, step: int, *, distributed: bool, first: bool = True
) -> dict | None:
    """What to do after an out-of-memory error: the doubled accumulation, or ``None``.

    Parameters
    ----------
    batch : int
        Samples per step (the batch, N).
    accumulation : int
        Current ``grad_accumulation`` (micro-batches per step).
    step : int
        The step that ran out of memory (0-based).
    distributed : bool
        Under DDP the ranks must agree on the micro-batches: no fallback.
    first : bool
        Log a warning (the first fallback of a run) rather than an info line.

    Returns
    -------
    dict or None
        ``step``, ``grad_accumulation`` (doubled, at most ``batch``), ``micro_batch`` (samples
        per micro-batch) and ``batch``, for ``summary.json``; ``None`` when the error must be
        raised (after ``OOM_FALLBACK_STEPS`` steps, micro-batches of one sample, or DDP).
    """
    micro = -(-batch // accumulation)
    if step >= OOM_FALLBACK_STEPS or micro < 2 or distributed:
        return None
    accumulation = min(batch, 2 * accumulation)
    micro = -(-batch // accumulation)
    (logger.warning if first else logger.info)(
        "Out of memory at step %d: continuing with %d micro-batches of <= %d samples "
        "(gradient accumulation keeps the batch of %d per step); recorded in summary.json. "
        "Start with --set grad_accumulation=%d to skip this.",
        *(step, accumulation, micro, batch, accumulation),
    )
    return {"step": step, "grad_accumulation": accumulation, "micro_batch": micro, "batch": batch}

"""Learning-rate schedule: linear warm-up, then cosine decay, a constant, or plateau cuts.

References
----------
I. Loshchilov, F. Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017,
arXiv:1608.03983 (cosine annealing); P. Goyal et al., "Accurate, Large Minibatch SGD",
arXiv:1706.02677 (linear warm-up).
"""

from __future__ import annotations

import math

from scarce.config import EngineConfig


def learning_rate(step: int, cfg: EngineConfig, plateau_scale: float = 1.0) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then cosine / constant / plateau.

    Parameters
    ----------
    step : int
        Optimiser step, counted from 0.
    cfg : EngineConfig
        ``max_steps`` (cosine reaches its floor there) and ``optim``: ``learning_rate``
        (peak), ``warmup_steps``, ``schedule`` and ``min_lr_fraction``.
    plateau_scale : float
        Factor the trainer has cut the peak by on plateaus (schedule ``plateau``).

    Returns
    -------
    float
        Cosine decays from the peak to ``min_lr_fraction * peak`` at ``max_steps``; plateau
        and constant keep the peak times ``plateau_scale``.
    """
    optim, max_steps = cfg.optim, cfg.max_steps
    peak = optim.learning_rate * plateau_scale
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return peak * (step + 1) / optim.warmup_steps
    if optim.schedule != "cosine":
        return peak
    span = max(1, max_steps - optim.warmup_steps)
    t = min(1.0, (step - optim.warmup_steps) / span)
    floor = optim.min_lr_fraction
    return optim.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))

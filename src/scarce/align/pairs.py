"""Pairwise fields: the network's field for one pair, its fine-tuning, and many pairs in parallel.

A pairwise field ``F`` pulls a raw source slice onto a raw target slice:
``warp(source, F) ~ target``. Pairwise fields are independent of each other, so
:func:`pairwise_fields` computes them in worker processes (each loads the model once and runs
one thread); the stack is then composed sequentially (:mod:`scarce.align.apply`), which is
cheap. Every computation of a pair runs with one intra-op thread, so the parallel path gives
the same numbers as the sequential one.

References
----------
seung-lab/metroem ``aligner.py`` / ``finetuner.py`` (per-pair fine-tuning of the network's
field by Adam on the pixel field, lr 0.1, smoothness-regularised similarity); seung-lab/corgie
(pairwise fields computed as independent tasks, composed afterwards).
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass

import numpy as np
import torch

from scarce.align.defects import defect_weights
from scarce.align.losses import masked_mse, smoothness
from scarce.engine.checkpoint import load_model
from scarce.engine.tiling import sliding_window_logits
from scarce.errors import InputError
from scarce.models.field import warp


class PairField(torch.nn.Module):
    """A field network as an image model for the sliding window: ``(N, 2, H, W)``
    ``[source, target]`` (or ``(N, 4, H, W)`` ``[source, target, source usable, target
    usable]``) in, the field ``(N, 2, H, W)`` out."""

    def __init__(self, net: torch.nn.Module, with_valid: bool = False):
        super().__init__()
        self.net = net
        self.in_channels = 4 if with_valid else 2
        self.size_multiple, self.halo = net.size_multiple, net.halo

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 4:
            return self.net.field(pair[:, :1], pair[:, 1:2], pair[:, 2:3], pair[:, 3:4])
        return self.net.field(pair[:, :1], pair[:, 1:2])


def normalise(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-slice z-score over valid pixels, 0 elsewhere (as the aligner was trained)."""
    values = image[valid].astype(np.float64)
    mean, std = (values.mean(), max(values.std(), 1e-6)) if values.size else (0.0, 1.0)
    return np.where(valid, (image - mean) / std, 0.0).astype(np.float32)


def network_field(
    net, source, target, *, tile_size: int, device, valid_s=None, valid_t=None
) -> torch.Tensor:
    """The network's field ``(1, 2, H, W)`` for ``(H, W)`` float32 slices (tiled if large).

    Slices are padded by reflection to a multiple of ``net.size_multiple`` and the field is
    cropped back; slices with a side above ``tile_size`` go through the engine's sliding
    window (fields of overlapping tiles are blended). ``valid_s``, ``valid_t`` ``(H, W)``
    (optional, together): 1 where the slice holds usable tissue, 0 on defects and missing
    data; the network neither matches there nor averages its matches across them
    (:meth:`scarce.models.fieldnet.FieldNet.forward`).
    """
    h, w = source.shape
    m = net.size_multiple
    planes = [source, target]
    if (valid_s is None) != (valid_t is None):
        raise InputError("network_field: give both valid_s and valid_t, or neither")
    if valid_s is not None:
        planes += [np.asarray(valid_s, np.float32), np.asarray(valid_t, np.float32)]
    if max(h, w) <= tile_size:
        pad = ((0, -h % m), (0, -w % m))
        x = [
            torch.from_numpy(np.pad(a, pad, mode="reflect"))[None, None].to(device) for a in planes
        ]
        with torch.no_grad():
            return net.field(*x)[..., :h, :w].float().cpu()
    stack = torch.from_numpy(np.stack(planes))
    field = sliding_window_logits(
        PairField(net, with_valid=len(planes) == 4),
        stack,
        tile_size=tile_size,
        overlap=0.5,
        batch_size=1,
        device=device,
    )
    return field[None]


@dataclass(frozen=True)
class FineTune:
    """Per-pair fine-tuning settings (0 steps: the network's field as it is).

    Attributes
    ----------
    steps : int
        Adam steps on the pixel field.
    lambda_smooth : float
        Smoothness weight (the training loss's).
    smoothness : str
        Penalty name (:data:`scarce.align.losses.PENALTIES`).
    lr : float
        Adam learning rate, pixels per step (metroem: 0.1).
    radius : int
        ``mask_neighborhood_radius`` for defect weights, pixels.
    sim_near, sim_in, smooth_near, smooth_in : float
        Defect weights (see :func:`scarce.align.defects.defect_weights`).
    """

    steps: int = 0
    lambda_smooth: float = 1.0
    smoothness: str = "rigidity"
    lr: float = 0.1
    radius: int = 20
    sim_near: float = 5.0
    sim_in: float = 0.0
    smooth_near: float = 0.05
    smooth_in: float = 0.0


def fine_tune(
    field, source, target, valid_s, valid_t, settings: FineTune, mask_s=None, mask_t=None
) -> torch.Tensor:
    """Refine a field by Adam steps on the training loss; the lr halves after 20 steps
    without improvement; returns the best field seen.

    Parameters
    ----------
    field : Tensor, shape (1, 2, H, W), pixels
        Start (the network's output).
    source, target, valid_s, valid_t : Tensor, shape (1, 1, H, W)
    settings : FineTune
    mask_s, mask_t : Tensor, shape (1, 1, H, W), optional
        Defect masks (0 normal); the source's is warped with the field (nearest) before use.
    """
    d = field.clone().requires_grad_(True)
    opt = torch.optim.Adam([d], lr=settings.lr)
    best, best_loss, stale = field.clone(), float("inf"), 0
    for _ in range(settings.steps):
        sim_w, smooth_w = loss_weights(d.detach(), valid_s, valid_t, settings, mask_s, mask_t)
        loss = masked_mse(warp(source, d), target, sim_w)
        loss = loss + settings.lambda_smooth * smoothness(d, settings.smoothness, smooth_w)
        value = float(loss.detach())
        if value < best_loss - 1e-6:
            best, best_loss, stale = d.detach().clone(), value, 0
        else:
            stale += 1
            if stale >= 20:
                for group in opt.param_groups:
                    group["lr"] /= 2
                stale = 0
        opt.zero_grad()
        loss.backward()
        opt.step()
    return best


def loss_weights(field, valid_s, valid_t, settings: FineTune, mask_s=None, mask_t=None):
    """Similarity and smoothness weights ``(N, 1, H, W)`` on the target's grid.

    Similarity counts where both slices hold data, scaled by the defect weights of the
    target's mask and of the source's mask pulled onto the target grid; missing data (mask
    class 3) never counts. Smoothness is scaled by the source's defect weights (the field may
    tear inside a crack), pulled onto the target grid.
    """
    moved_valid = (warp(valid_s, field) > 0.999).float()
    sim = valid_t * moved_valid
    smooth = torch.ones_like(sim)
    if mask_s is not None or mask_t is not None:
        near, inside = settings.sim_near, settings.sim_in
        for mask, moved in ((mask_t, False), (mask_s, True)):
            if mask is None:
                continue
            m = warp(mask.float(), field, mode="nearest", padding="border") if moved else mask
            sim = sim * defect_weights(m, settings.radius, near=near, inside=inside)
            sim = sim * (m != 3).float()
            if moved:
                smooth = defect_weights(
                    m, settings.radius, near=settings.smooth_near, inside=settings.smooth_in
                )
    return sim, smooth


def pair_job(net, job: dict, *, tile_size: int, device, settings: FineTune):
    """The (fine-tuned) field ``(1, 2, H, W)`` of one pair ``job`` (source/target arrays, valid
    and masks) and the seconds it took.

    Where either slice has missing data (``valid_*`` False) or a defect (``mask_*`` > 0), the
    network gets usable-tissue maps (no matching there, no averaging across it); otherwise
    the plain path runs.
    """
    start = time.perf_counter()
    usable = {}
    for side in ("s", "t"):  # tissue that is there and not a defect
        valid, mask = job.get(f"valid_{side}"), job.get(f"mask_{side}")
        ok = np.ones(job["source"].shape, bool) if valid is None else np.asarray(valid) > 0
        usable[f"valid_{side}"] = ok if mask is None else ok & (np.asarray(mask) == 0)
    if all(v.all() for v in usable.values()):
        usable = {}  # nothing to exclude: the plain (faster) path
    field = network_field(
        net, job["source"], job["target"], tile_size=tile_size, device=device, **usable
    )
    if settings.steps:
        tensors = {
            k: torch.from_numpy(np.asarray(v, np.float32))[None, None]
            for k, v in job.items()
            if v is not None
        }
        field = fine_tune(
            field,
            tensors["source"],
            tensors["target"],
            tensors["valid_s"],
            tensors["valid_t"],
            settings,
            tensors.get("mask_s"),
            tensors.get("mask_t"),
        )
    return field, time.perf_counter() - start


_WORKER: dict = {}


def _init_worker(model_path, device) -> None:
    torch.set_num_threads(1)
    _WORKER["net"], _ = load_model(model_path, device)
    _WORKER["device"] = device


def _run(args) -> tuple:
    key, job, tile_size, settings = args
    return key, pair_job(
        _WORKER["net"], job, tile_size=tile_size, device=_WORKER["device"], settings=settings
    )


def pairwise_fields(
    model_path,
    jobs: dict,
    *,
    tile_size: int = 1024,
    device="cpu",
    settings: FineTune = FineTune(),
    workers: int = 1,
    progress=None,
) -> dict:
    """The fields of many pairs: ``{key: ((1, 2, H, W) field, seconds)}`` for ``{key: job}``.

    Parameters
    ----------
    model_path : path-like
        The aligner (run folder or checkpoint).
    jobs : dict
        Key (e.g. ``(z, target_z)``) -> ``{"source", "target", "valid_s", "valid_t",
        "mask_s", "mask_t"}`` arrays ``(H, W)`` (masks may be None).
    workers : int
        Worker processes (1: in this process). Each runs one thread, as the sequential path
        does, so both give the same fields.
    progress : callable, optional
        Called once per finished pair.
    """
    out = {}
    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            net, _ = load_model(model_path, device)
            for key, job in jobs.items():
                out[key] = pair_job(net, job, tile_size=tile_size, device=device, settings=settings)
                if progress:
                    progress()
        finally:
            torch.set_num_threads(threads)
        return out
    context = multiprocessing.get_context("spawn")
    tasks = [(key, job, tile_size, settings) for key, job in jobs.items()]
    with context.Pool(
        workers, initializer=_init_worker, initargs=(str(model_path), device)
    ) as pool:
        for key, field in pool.imap_unordered(_run, tasks):
            out[key] = field
            if progress:
                progress()
    return out


__all__ = [
    "FineTune",
    "PairField",
    "fine_tune",
    "loss_weights",
    "network_field",
    "normalise",
    "pair_job",
    "pairwise_fields",
]

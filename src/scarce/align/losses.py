"""Self-supervised alignment losses: masked similarity, smoothness penalties, fold barrier.

The aligner is trained without ground truth: warp the source with the predicted field, compare
with the target where both hold data, and keep the field smooth. Images are normalised per
slice (zero mean, unit standard deviation over valid pixels) before they get here, so the MSE
is about 2 for unrelated content and ``lambda_smooth`` means the same on any data. Fields are
``(N, 2, H, W)`` in pixels (channel 0 = dy, 1 = dx); every penalty returns a per-pixel map
``(N, H, W)`` that the caller weights (defect masks make the weights small where the field may
tear). :func:`pair_loss` assembles the training loss over the pyramid levels with the defect
weights of SEAMLeSS (:func:`level_weights`); :func:`full_loss` is its full-resolution form, the
test loss that stays comparable across training stages.

References
----------
E. Mitchell et al., arXiv:1904.02643 (2019) and seung-lab/SEAMLeSS ``training/loss.py``
(``lap``, ``jacob``, ``cjacob``, ``tv``); seung-lab/metroem ``loss.py`` (``rigidity``: the
elastic energy of a spring mesh joining every pixel to its 8 neighbours).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from scarce.align.config import AlignConfig
from scarce.align.defects import defect_weights
from scarce.models.field import jacobian_determinant, upsample, warp

_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def masked_mse(
    a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum(w (a - b)**2) / sum(w)`` over pixels and channels; 0 when every weight is 0.

    Parameters
    ----------
    a, b : Tensor, shape (N, C, H, W)
    weight : Tensor, shape (N, 1, H, W) or (N, C, H, W), optional
        Non-negative weights (0 = excluded, e.g. missing data); default all ones.
    """
    err = (a.float() - b.float()) ** 2
    if weight is None:
        return err.mean()
    w = weight.float().expand_as(err)
    return (err * w).sum() / w.sum().clamp_min(1e-8)


def _shift(field: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``field`` read at ``(y + dy, x + dx)``, replicating the border."""
    padded = F.pad(field, (1, 1, 1, 1), mode="replicate")
    h, w = field.shape[-2:]
    return padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def _central(field: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences ``(d/dy, d/dx)`` of ``(N, 2, H, W)``, halved, replicate border."""
    ddy = (_shift(field, 1, 0) - _shift(field, -1, 0)) / 2
    ddx = (_shift(field, 0, 1) - _shift(field, 0, -1)) / 2
    return ddy, ddx


def laplacian_penalty(field: torch.Tensor) -> torch.Tensor:
    """``lap``: squared deviation of each vector from the mean of its 4 neighbours."""
    mean4 = sum(_shift(field, dy, dx) for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1))) / 4
    return ((field - mean4) ** 2).sum(1)


def jacobian_penalty(field: torch.Tensor) -> torch.Tensor:
    """``jacob``: squared central differences of both components (penalises any gradient)."""
    ddy, ddx = _central(field)
    return (ddy**2 + ddx**2).sum(1)


def centred_jacobian_penalty(field: torch.Tensor) -> torch.Tensor:
    """``cjacob``: central differences minus their mean over the image, squared.

    A field whose gradient is the same everywhere (an affine motion: rotation, scale, shear)
    costs nothing; only deviations from the mean gradient do.
    """
    ddy, ddx = _central(field)
    ddy = ddy - ddy.mean(dim=(2, 3), keepdim=True)
    ddx = ddx - ddx.mean(dim=(2, 3), keepdim=True)
    return (ddy**2 + ddx**2).sum(1)


def total_variation_penalty(field: torch.Tensor) -> torch.Tensor:
    """``tv``: absolute central differences (allows sharp steps, unlike the squared ones)."""
    ddy, ddx = _central(field)
    return (ddy.abs() + ddx.abs()).sum(1)


def rigidity_penalty(field: torch.Tensor) -> torch.Tensor:
    """``rigidity``: spring energy of the mesh of pixels moved by the field (metroem).

    Pixel p moves to ``p + D(p)``; a spring joins it to each of its 8 neighbours q with rest
    length ``|q - p|`` (1 or sqrt 2). The energy of pixel p is the mean over the 8 springs of
    ``(|q - p + D(q) - D(p)| - |q - p|)**2``, so translations and rotations cost nothing and
    any stretch or shear does. At the border only the springs to pixels inside count.
    """
    h, w = field.shape[-2:]
    energy = torch.zeros_like(field[:, 0])
    springs = torch.zeros((h, w), dtype=field.dtype, device=field.device)
    for dy, dx in _NEIGHBOURS:
        rel = field.new_tensor([dy, dx]).view(1, 2, 1, 1) + _shift(field, dy, dx) - field
        length = torch.sqrt((rel**2).sum(1) + 1e-12)
        inside = torch.zeros((h, w), dtype=field.dtype, device=field.device)
        inside[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = 1.0
        energy = energy + inside * (length - math.hypot(dy, dx)) ** 2
        springs = springs + inside
    return energy / springs.clamp_min(1.0)


PENALTIES = {
    "lap": laplacian_penalty,
    "jacob": jacobian_penalty,
    "cjacob": centred_jacobian_penalty,
    "tv": total_variation_penalty,
    "rigidity": rigidity_penalty,
}


def smoothness(field: torch.Tensor, kind: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean of the per-pixel penalty ``kind`` (a key of :data:`PENALTIES`).

    Parameters
    ----------
    field : Tensor, shape (N, 2, H, W), pixels
    kind : {"lap", "jacob", "cjacob", "tv", "rigidity"}
    weight : Tensor, shape (N, 1, H, W) or (N, H, W), optional

    Raises
    ------
    ValueError
        For an unknown ``kind``.
    """
    if kind not in PENALTIES:
        raise ValueError(f"smoothness penalty {kind!r} is not one of {sorted(PENALTIES)}")
    penalty = PENALTIES[kind](field.float())  # (N, H, W)
    if weight is None:
        return penalty.mean()
    w = weight.float().reshape(penalty.shape)
    return (penalty * w).sum() / w.sum().clamp_min(1e-8)


def fold_barrier(
    field: torch.Tensor, margin: float = 0.1, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``relu(margin - det(I + grad D))**2``: zero while the field keeps orientation
    with some room, growing quadratically as it approaches a fold (det <= 0).

    Not in SEAMLeSS (which relies on masks); an addition of Scarce's.
    """
    det = jacobian_determinant(field)
    barrier = F.relu(margin - det) ** 2
    if weight is None:
        return barrier.mean()
    w = weight.float().reshape(barrier.shape)
    return (barrier * w).sum() / w.sum().clamp_min(1e-8)


def pooled(x: torch.Tensor, level: int) -> torch.Tensor:
    """Average-pool ``(N, C, H, W)`` by ``2**level`` (level 0: unchanged)."""
    return F.avg_pool2d(x, 2**level) if level else x


def level_weights(valid_s, valid_t, mask_s, mask_t, field, cfg: AlignConfig):
    """Similarity and smoothness weights ``(N, 1, h, w)`` on the target's grid at one level.

    Similarity counts where both slices hold data (the source's validity pulled by the field),
    times SEAMLeSS's defect weights (``lambda_sim_near`` within ``mask_neighborhood_radius`` of
    a defect, ``lambda_sim_in`` inside) of the target mask and of the pulled source mask;
    missing data (class 3) never counts. Smoothness is weighted by ``lambda_smooth_near`` /
    ``lambda_smooth_in`` around the pulled source's defects (the field may tear in a crack).
    """
    lo = cfg.loss
    weight = valid_t * (warp(valid_s, field, padding="zeros") > 0.999).float()
    smooth = torch.ones_like(weight)
    if mask_s is None or not (mask_s.any() or mask_t.any()):
        return weight, smooth
    moved = warp(mask_s, field, mode="nearest", padding="border")
    radius = max(1, round(lo.mask_neighborhood_radius * field.shape[-1] / valid_t.shape[-1]))
    for m in (mask_t, moved):
        weight = (
            weight
            * defect_weights(m, radius, near=lo.lambda_sim_near, inside=lo.lambda_sim_in)
            * (m != 3).float()
        )
    smooth = defect_weights(moved, radius, near=lo.lambda_smooth_near, inside=lo.lambda_smooth_in)
    return weight, smooth


def pair_loss(
    fields: dict, source, target, valid_s, valid_t, cfg: AlignConfig, mask_s=None, mask_t=None
) -> torch.Tensor:
    """Mean over the computed levels (and full resolution) of similarity + smoothness.

    Parameters
    ----------
    fields : dict of int to Tensor
        Level -> field ``(N, 2, H / 2**l, W / 2**l)`` from :class:`FieldNet`.
    source, target : Tensor, shape (N, 1, H, W)
        Clean, per-slice normalised slices.
    valid_s, valid_t : Tensor, shape (N, 1, H, W)
        1 where each holds data (the source's validity is warped with the field).
    cfg : AlignConfig
        ``loss`` weights.
    mask_s, mask_t : Tensor, shape (N, 1, H, W), optional
        Defect classes (see :func:`level_weights`).

    Returns
    -------
    Tensor, scalar float32
    """
    terms = dict(fields)
    finest = min(fields)
    if finest > 0 and finest == cfg.model.finest_level:
        terms[0] = upsample(fields[finest], 2**finest)  # the output the user gets
    lo = cfg.loss
    total = 0.0
    for level, field in terms.items():
        s, t = pooled(source, level), pooled(target, level)
        vs, vt = pooled(valid_s, level), (pooled(valid_t, level) > 0.999).float()
        ms = mt = None
        if mask_s is not None:
            ms, mt = (F.max_pool2d(m, 2**level) if level else m for m in (mask_s, mask_t))
        weight, smooth = level_weights(vs, vt, ms, mt, field, cfg)
        total = total + masked_mse(warp(s, field), t, weight)
        total = total + lo.lambda_smooth * smoothness(field, lo.smoothness, smooth)
        if lo.lambda_fold > 0:
            total = total + lo.lambda_fold * fold_barrier(field, lo.fold_margin)
    return total / len(terms)


def full_loss(field, source, target, valid_s, valid_t, cfg: AlignConfig) -> torch.Tensor:
    """The training loss at full resolution only: comparable across stages (the test loss).

    Parameters
    ----------
    field : Tensor, shape (N, 2, H, W)
        The final field at the slices' resolution.
    source, target, valid_s, valid_t : Tensor, shape (N, 1, H, W)
    cfg : AlignConfig
    """
    weight = valid_t * (warp(valid_s, field, padding="zeros") > 0.999).float()
    loss = masked_mse(warp(source, field), target, weight)
    return loss + cfg.loss.lambda_smooth * smoothness(field, cfg.loss.smoothness)


__all__ = [
    "PENALTIES",
    "full_loss",
    "level_weights",
    "pair_loss",
    "pooled",
    "centred_jacobian_penalty",
    "fold_barrier",
    "jacobian_penalty",
    "laplacian_penalty",
    "masked_mse",
    "rigidity_penalty",
    "smoothness",
    "total_variation_penalty",
]

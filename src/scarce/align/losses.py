"""Self-supervised alignment losses: masked similarity, smoothness penalties, fold barrier.

The aligner is trained without ground truth: warp the source with the predicted field, compare
with the target where both hold data, and keep the field smooth. Images are normalised per
slice (zero mean, unit standard deviation over valid pixels) before they get here, so the MSE
is about 2 for unrelated content and ``lambda_smooth`` means the same on any data. Fields are
``(N, 2, H, W)`` in pixels (channel 0 = dy, 1 = dx); every penalty returns a per-pixel map
``(N, H, W)`` that the caller weights (defect masks make the weights small where the field may
tear).

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

from scarce.models.field import jacobian_determinant

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


__all__ = [
    "PENALTIES",
    "centred_jacobian_penalty",
    "fold_barrier",
    "jacobian_penalty",
    "laplacian_penalty",
    "masked_mse",
    "rigidity_penalty",
    "smoothness",
    "total_variation_penalty",
]

"""Whole-stack robustness: vector voting over neighbours, and drift control.

**Voting.** Slice z can be aligned through each of its K previous neighbours (z-1, z-2, ...),
each candidate composed through that neighbour's field. Where one neighbour is bad (a fold, a
missing slice), its candidate disagrees with the others; the softmin vote of SEAMLeSS/corgie
weights every subset of ``m = (K + 1) // 2`` candidates by ``softmax(-D_S / T)`` where ``D_S``
is the mean pairwise distance of the subset's vectors (after a light blur), so the field
follows the largest group that agrees. The distance of the best subset is kept as a
per-pixel disagreement (a confidence map: small = the neighbours agree).

**Drift control.** Composing pairwise fields down a stack accumulates their errors. The
composed field is split into a spatial low-pass part (a Gaussian of ``sigma`` px: bulk
translation, rotation, large bends) and the rest; the low-pass part is multiplied by
``1 - decay`` at every slice, so slow drift is pulled back towards the slices' own frames
while local alignment between neighbours is kept (corgie's "composition with decay", as a
low/high-pass split requested by corgie users).

References
----------
E. Mitchell et al., arXiv:1904.02643 (2019), and seung-lab/SEAMLeSS ``helpers.vector_vote``;
seung-lab/corgie / torchfields ``voting.py`` (softmin over subsets); S. Popovych et al.,
"Petascale pipeline for precise alignment of images from serial section electron microscopy",
Nature Communications 15, 289 (2024), doi:10.1038/s41467-023-44354-0 (composition with decay).
"""

from __future__ import annotations

import itertools

import torch

from scarce.models.matching import gaussian_smooth


def _blur(field: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return field
    return gaussian_smooth(field, torch.ones_like(field[:, :1]), sigma)


def softmin_vote(
    candidates: torch.Tensor, *, temperature: float = 1.0, blur_sigma: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine K candidate fields per pixel by the softmin over subsets that agree.

    Parameters
    ----------
    candidates : Tensor, shape (K, N, 2, H, W)
        Fields (pixels) for the same slice through K different neighbours; K >= 1 (odd K
        gives a strict majority).
    temperature : float
        ``T`` of ``softmax(-D_S / T)``, pixels: a subset 3T closer than the others gets ~95 %
        of the weight.
    blur_sigma : float
        Gaussian blur of the candidates for the distances only, pixels.

    Returns
    -------
    field : Tensor, shape (N, 2, H, W)
        ``sum_i w_i f_i`` with ``w_i = sum over subsets S containing i of a_S / m``.
    disagreement : Tensor, shape (N, 1, H, W)
        ``D_S`` of the most trusted subset, pixels (0 when K = 1).

    References
    ----------
    seung-lab/SEAMLeSS ``utilities/helpers.py`` ``vector_vote``; torchfields ``voting.py``.
    """
    k = candidates.shape[0]
    if k == 1:
        return candidates[0], torch.zeros_like(candidates[0][:, :1])
    m = (k + 1) // 2
    blurred = torch.stack([_blur(c, blur_sigma) for c in candidates])
    subsets = list(itertools.combinations(range(k), m))
    distances = []
    for subset in subsets:
        pairs = list(itertools.combinations(subset, 2))
        if not pairs:  # m == 1: a single candidate agrees with itself
            distances.append(torch.zeros_like(blurred[0][:, :1]))
            continue
        d = sum(
            torch.linalg.vector_norm(blurred[i] - blurred[j], dim=1, keepdim=True) for i, j in pairs
        )
        distances.append(d / len(pairs))
    distance = torch.stack(distances)  # (S, N, 1, H, W)
    attention = torch.softmax(-distance / temperature, dim=0)
    weights = torch.zeros(k, *distance.shape[1:], dtype=distance.dtype, device=distance.device)
    for s, subset in enumerate(subsets):
        for i in subset:
            weights[i] = weights[i] + attention[s] / m
    field = (weights * candidates).sum(0)
    best = distance.gather(0, attention.argmax(0, keepdim=True))[0]
    return field, best


def lowpass(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian low-pass of a field ``(N, 2, H, W)`` with std ``sigma`` pixels (edges kept)."""
    return _blur(field, sigma)


def decay_drift(field: torch.Tensor, *, decay: float, sigma: float) -> torch.Tensor:
    """``field - decay * lowpass(field)``: pull the slow (low-pass) part back by ``decay``.

    Parameters
    ----------
    field : Tensor, shape (N, 2, H, W)
        A composed field, pixels.
    decay : float
        In [0, 1]: the share of the low-pass part removed at this slice (0 = off).
    sigma : float
        Std of the low-pass Gaussian, pixels.
    """
    if decay <= 0:
        return field
    return field - decay * lowpass(field, sigma)


__all__ = ["decay_drift", "lowpass", "softmin_vote"]

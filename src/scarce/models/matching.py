"""Matching primitives of the field network: cost volume, soft-argmax, smoothing, affine fit.

Per pyramid level :class:`scarce.models.fieldnet.FieldNet` compares the warped source encoding
with the target encoding at every offset within a radius (:func:`correlation`), turns the
similarities into one offset per pixel (the soft-argmax, :func:`expected_offset`), and averages those offsets over a
neighbourhood, trusting peaked matches (:func:`gaussian_smooth`), or within the regions a defect
mask leaves (:func:`region_smooth`, :func:`regions_of`), or fits one affine motion to them
(:func:`robust_affine`). Fields are ``(N, 2, H, W)`` float32 in pixels of their level, channel
0 = dy, 1 = dx.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
import torch


def correlation(source: torch.Tensor, target: torch.Tensor, radius: int) -> torch.Tensor:
    """Cost volume: the cosine similarity of each target feature vector with the source
    feature vectors at every offset ``(dy, dx)`` in ``[-radius, radius]**2``.

    Parameters
    ----------
    source, target : Tensor, shape (N, C, H, W)
    radius : int
        Largest offset, pixels of this level.

    Returns
    -------
    Tensor, shape (N, (2 radius + 1)**2, H, W)
        Channel ``(dy + r) * (2r + 1) + (dx + r)`` holds the similarity with the source at
        ``(y + dy, x + dx)`` (zero outside the image).

    References
    ----------
    D. Sun, X. Yang, M.-Y. Liu, J. Kautz, "PWC-Net: CNNs for Optical Flow Using Pyramid,
    Warping, and Cost Volume", CVPR 2018, arXiv:1709.02371.
    """
    h, w = source.shape[-2:]
    k = 2 * radius + 1
    s = torch.nn.functional.normalize(source, dim=1)
    t = torch.nn.functional.normalize(target, dim=1)
    padded = torch.nn.functional.pad(s, (radius,) * 4)
    # one offset row at a time: (N, C, H, W, k) windows along x, contracted over C; 2.5x
    # faster on a CPU than unfolding all k*k offsets at once (no (N, C, k*k, H, W) copy)
    rows = [
        torch.einsum("nchwk,nchw->nkhw", padded[:, :, i : i + h].unfold(3, k, 1), t)
        for i in range(k)
    ]
    return torch.cat(rows, 1)  # (N, k*k, H, W)


def expected_offset(weights: torch.Tensor, radius: int) -> torch.Tensor:
    """``(dy, dx)`` ``(N, 2, H, W)`` averaged over the cost volume's offsets with ``weights``
    ``(N, (2r+1)**2, H, W)`` (summing to 1 over the channels), pixels of the level. With
    ``weights = softmax(temperature * cost)`` this is the soft-argmax of the cost volume
    (Kendall et al., "End-to-end learning of geometry and context for deep stereo
    regression", ICCV 2017)."""
    k = 2 * radius + 1
    offsets = torch.arange(-radius, radius + 1, dtype=weights.dtype, device=weights.device)
    dy = offsets.repeat_interleave(k).view(1, k * k, 1, 1)
    dx = offsets.repeat(k).view(1, k * k, 1, 1)
    return torch.cat([(weights * dy).sum(1, keepdim=True), (weights * dx).sum(1, keepdim=True)], 1)


def gaussian_smooth(field: torch.Tensor, weight: torch.Tensor, sigma: float) -> torch.Tensor:
    """Normalised convolution: ``G * (w f) / G * w`` with a Gaussian ``G`` of std ``sigma``.

    Averages a noisy per-pixel estimate ``field`` ``(N, 2, H, W)`` over its neighbourhood,
    trusting each pixel by ``weight`` ``(N, 1, H, W)`` (e.g. how peaked its match is);
    borders are handled by the normalisation (zero padding in both convolutions).

    References
    ----------
    H. Knutsson, C.-F. Westin, "Normalized and differential convolution", CVPR 1993.
    """
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=field.dtype, device=field.device)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel_y, kernel_x = g.view(1, 1, -1, 1), g.view(1, 1, 1, -1)

    def blur(a: torch.Tensor) -> torch.Tensor:
        c = a.shape[1]
        a = torch.nn.functional.conv2d(
            a, kernel_y.expand(c, 1, -1, 1), padding=(radius, 0), groups=c
        )
        return torch.nn.functional.conv2d(
            a, kernel_x.expand(c, 1, 1, -1), padding=(0, radius), groups=c
        )

    return blur(field * weight) / blur(weight).clamp_min(1e-6)


def robust_affine(
    field: torch.Tensor, weight: torch.Tensor, *, scale: float = 2.0, iterations: int = 3
) -> torch.Tensor:
    """The affine field that best explains a noisy field: weighted least squares, reweighted.

    Fits ``D(p) = A [y, x, 1]`` to ``field`` ``(N, 2, H, W)`` with weights ``weight``
    ``(N, 1, H, W)``, then ``iterations`` times down-weights each pixel by
    ``1 / (1 + (r / scale)**2)`` (Cauchy), ``r`` its residual in pixels, and refits: matches on
    look-alike structures far from the consensus stop pulling the fit.

    Returns
    -------
    Tensor, shape (N, 2, H, W)
        The affine field on the same grid.

    References
    ----------
    P. W. Holland, R. E. Welsch, "Robust regression using iteratively reweighted
    least-squares", Communications in Statistics 6 (1977), doi:10.1080/03610927708827533.
    """
    n, _, h, w = field.shape
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, h, device=field.device, dtype=field.dtype),
        torch.linspace(-1, 1, w, device=field.device, dtype=field.dtype),
        indexing="ij",
    )
    basis = torch.stack([yy, xx, torch.ones_like(yy)], -1).reshape(1, h * w, 3)  # (1, P, 3)
    target = field.reshape(n, 2, h * w).transpose(1, 2)  # (N, P, 2)
    w_ = weight.reshape(n, h * w, 1).clamp_min(0)
    eye = 1e-4 * torch.eye(3, device=field.device, dtype=field.dtype)
    for step in range(iterations + 1):
        xtw = (basis * w_).transpose(1, 2)  # (N, 3, P)
        coef = torch.linalg.solve(xtw @ basis + eye, xtw @ target)  # (N, 3, 2)
        fitted = basis @ coef  # (N, P, 2)
        if step < iterations:
            residual = torch.linalg.vector_norm(target - fitted, dim=2, keepdim=True)
            w_ = weight.reshape(n, h * w, 1) / (1 + (residual.detach() / scale) ** 2)
    return fitted.transpose(1, 2).reshape(n, 2, h, w)


def _components(image: np.ndarray, structure=None) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a 2D bool array: labels ``(H, W)`` int (0 = background) and
    each label's pixel count (``sizes[labels]`` is the size of a pixel's component)."""
    labels, count = ndi.label(image, structure=structure)
    return labels, np.bincount(labels.ravel(), minlength=count + 1)


def regions_of(valid: torch.Tensor, min_size: int = 1) -> torch.Tensor:
    """Connected regions of usable pixels: where a crack or fold cuts a section, its two sides.

    Parameters
    ----------
    valid : Tensor, shape (N, 1, H, W)
        Usable fraction of each pixel (1 usable; 0.5 or less counts as a defect or missing
        data).
    min_size : int
        Regions with fewer pixels are dropped (label 0), pixels.

    Returns
    -------
    Tensor, shape (N, H, W), int64
        A positive label per 4-connected region (an 8-connected seam separates them; labels
        of dropped regions are skipped), 0 on defects and dropped regions; on ``valid``'s
        device. Labelled with ``scipy.ndimage.label`` on the CPU.
    """
    usable = (valid[:, 0] > 0.5).cpu().numpy()
    out = np.zeros(usable.shape, np.int64)
    for n, image in enumerate(usable):
        labels, sizes = _components(image)
        out[n] = np.where(sizes[labels] >= min_size, labels, 0)
    return torch.from_numpy(out).to(valid.device)


def fill_specks(valid: torch.Tensor, max_size: int) -> torch.Tensor:
    """``valid`` with every unusable speck (a 8-connected group of fewer than ``max_size``
    pixels, e.g. scattered pixels that happen to equal the missing-data value) marked usable.

    Parameters
    ----------
    valid : Tensor, shape (N, 1, H, W)
        1 usable, 0 a defect or missing data.
    max_size : int
        Pixels.

    Returns
    -------
    Tensor, shape (N, 1, H, W), float32, on ``valid``'s device (labelled with
    ``scipy.ndimage.label`` on the CPU).
    """
    bad = (valid[:, 0] <= 0.5).cpu().numpy()
    out = valid.float().clone()
    for n, image in enumerate(bad):
        labels, sizes = _components(image, np.ones((3, 3)))
        specks = (labels > 0) & (sizes[labels] < max_size)
        out[n, 0][torch.from_numpy(specks).to(valid.device)] = 1.0
    return out


def region_smooth(
    field: torch.Tensor, weight: torch.Tensor, sigma: float, regions: torch.Tensor
) -> torch.Tensor:
    """:func:`gaussian_smooth` within each region: no averaging across a defect.

    A crack or fold tears the tissue, so the field jumps across it; averaging over the tear
    would drag both sides towards the middle. Each region of ``regions`` ``(N, H, W)`` (from
    :func:`regions_of`) is smoothed with the weights of its own pixels only, on its bounding
    box grown by the Gaussian's radius (the same numbers as on the whole image, at a cost that
    grows with the regions' area, not their number); pixels of label 0 (defects and dropped
    small regions) take the plain weighted average of their neighbourhood.

    Parameters
    ----------
    field : Tensor, shape (N, 2, H, W)
    weight : Tensor, shape (N, 1, H, W)
    sigma : float
        Gaussian standard deviation, pixels of the level.
    regions : Tensor, shape (N, H, W), int64

    Returns
    -------
    Tensor, shape (N, 2, H, W)

    References
    ----------
    Follows SEAMLeSS's lowered smoothness weight at cracks and folds (Mitchell et al. 2019,
    arXiv:1904.02643, section 4) for a smoothing that is a convolution, not a penalty.
    """
    out = gaussian_smooth(field, weight, sigma)
    pad = max(1, int(3 * sigma))  # gaussian_smooth's kernel radius
    h, w = field.shape[-2:]
    for n in range(field.shape[0]):
        boxes = ndi.find_objects(regions[n].cpu().numpy())
        for label, box in enumerate(boxes, start=1):
            if box is None:  # a dropped region's label
                continue
            y0, y1 = max(box[0].start - pad, 0), min(box[0].stop + pad, h)
            x0, x1 = max(box[1].start - pad, 0), min(box[1].stop + pad, w)
            crop = (slice(n, n + 1), slice(None), slice(y0, y1), slice(x0, x1))
            inside = (regions[n, y0:y1, x0:x1] == label)[None, None].to(field.dtype)
            part = gaussian_smooth(field[crop], weight[crop] * inside, sigma)
            out[crop] = torch.where(inside > 0, part, out[crop])
    return out


__all__ = [
    "correlation",
    "expected_offset",
    "fill_specks",
    "gaussian_smooth",
    "region_smooth",
    "regions_of",
    "robust_affine",
]

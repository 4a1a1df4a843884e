"""Displacement fields: the one convention, warping, composition, resizing, inversion, folds.

**Convention.** A field ``D`` is float32 ``(N, 2, H, W)`` in **pixels**; channel 0 is ``dy``
(rows), channel 1 is ``dx`` (columns). It *pulls*: ``aligned(y, x) = source(y + D[0](y, x),
x + D[1](y, x))`` with bilinear interpolation, so the field lives on the target's grid and
points into the source. Pixel centres are at integer coordinates. Missing data is an explicit
mask (``valid``), never "the value 0".

**Composition.** ``compose(a, b)(x) = a(x) + b(x + a(x))`` is the field that warps like ``b``
first and ``a`` second: ``warp(warp(I, b), a) == warp(I, compose(a, b))``. In the notation
``D_ab`` = "a, then b", ``D_ab(x) = D_b(x) + D_a(x + D_b(x)) = compose(b, a)(x)``.

**Resizing.** A field in pixels scales with the image: :func:`upsample` by 2 doubles its
values, :func:`downsample` halves them.

It lives beside the networks because the field network (:mod:`scarce.models.fieldnet`) warps
and composes inside its forward pass; the alignment task (:mod:`scarce.align`) uses the same
functions. This module is the only place that converts to ``torch.nn.functional.grid_sample``'s
``(N, H, W, 2)`` x-first normalised grid, always with ``align_corners=False`` (the grid's -1
and +1 are the outer edges of the border pixels). Warps run in float32 even under autocast:
a bf16 sampling grid would be off by up to ~0.5 px at 512 px.

References
----------
E. Mitchell, S. Keselj, S. Popovych, D. Buniatyan, H. S. Seung, "Siamese Encoding and
Alignment by Multiscale Learning with Self-Supervision", arXiv:1904.02643 (2019); the same
pull convention and composition order as seung-lab/torchfields (``Field.compose_with``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PADDINGS = ("zeros", "border", "reflection")


def _check_field(field: torch.Tensor, what: str = "field") -> None:
    if field.ndim != 4 or field.shape[1] != 2:
        raise ValueError(f"{what} must be (N, 2, H, W) pixels (dy, dx); got {tuple(field.shape)}")


def identity_grid(height: int, width: int, device=None) -> torch.Tensor:
    """Pixel coordinates of every pixel: ``(1, 2, H, W)`` float32, channel 0 = y, 1 = x."""
    y = torch.arange(height, dtype=torch.float32, device=device)
    x = torch.arange(width, dtype=torch.float32, device=device)
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([yy, xx])[None]


def to_grid(field: torch.Tensor) -> torch.Tensor:
    """The ``grid_sample`` grid of a pixel field: ``(N, H, W, 2)``, x first, in [-1, 1].

    With ``align_corners=False`` the normalised coordinate of pixel position ``p`` on an axis
    of length ``n`` is ``(2 p + 1) / n - 1``.

    Parameters
    ----------
    field : Tensor, shape (N, 2, H, W), float
        Pixel displacements (dy, dx).

    Returns
    -------
    Tensor, shape (N, H, W, 2), float32
    """
    _check_field(field)
    n, _, h, w = field.shape
    pos = identity_grid(h, w, field.device) + field.float()  # (N, 2, H, W) absolute (y, x)
    gy = (2.0 * pos[:, 0] + 1.0) / h - 1.0
    gx = (2.0 * pos[:, 1] + 1.0) / w - 1.0
    return torch.stack([gx, gy], dim=-1)


def warp(
    image: torch.Tensor,
    field: torch.Tensor,
    *,
    mode: str = "bilinear",
    padding: str = "zeros",
) -> torch.Tensor:
    """Pull ``image`` through ``field``: ``out(y, x) = image(y + dy, x + dx)``.

    Parameters
    ----------
    image : Tensor, shape (N, C, H, W)
        Image, mask or field (a field is warped as a 2-channel image).
    field : Tensor, shape (N, 2, H, W) or (1, 2, H, W), pixels
        Displacements on the output grid; a batch of 1 broadcasts.
    mode : {"bilinear", "nearest"}
    padding : {"zeros", "border", "reflection"}
        Values read outside the image: zero for images (mark them invalid), ``border`` for
        masks and fields.

    Returns
    -------
    Tensor, shape (N, C, H, W), float32
        The zero field returns ``image`` exactly (a copy, without resampling).

    Raises
    ------
    ValueError
        For mismatched shapes or an unknown ``padding``.
    """
    _check_field(field)
    if image.ndim != 4 or image.shape[-2:] != field.shape[-2:]:
        raise ValueError(
            f"image {tuple(image.shape)} and field {tuple(field.shape)} must be (N, C, H, W) "
            "and (N, 2, H, W) of the same H, W"
        )
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if field.shape[0] == 1 and image.shape[0] > 1:
        field = field.expand(image.shape[0], -1, -1, -1)
    if not field.requires_grad and not field.any():  # grid_sample is exact only to ~1e-6
        return image.float().clone()
    with torch.autocast(image.device.type, enabled=False):
        return F.grid_sample(
            image.float(), to_grid(field), mode=mode, padding_mode=padding, align_corners=False
        )


def compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The field of warping by ``b`` first, then by ``a``: ``a(x) + b(x + a(x))``.

    ``warp(warp(I, b), a) == warp(I, compose(a, b))`` up to interpolation. ``b`` is read
    with border padding.

    Parameters
    ----------
    a, b : Tensor, shape (N, 2, H, W), pixels

    Returns
    -------
    Tensor, shape (N, 2, H, W), float32
    """
    return a.float() + warp(b, a, padding="border")


def upsample(field: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Bilinear upsampling of a pixel field by ``factor``; the values scale by ``factor`` too.

    Returns
    -------
    Tensor, shape (N, 2, factor * H, factor * W), float32
    """
    _check_field(field)
    with torch.autocast(field.device.type, enabled=False):
        up = F.interpolate(field.float(), scale_factor=factor, mode="bilinear", align_corners=False)
    return up * factor


def downsample(field: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Average-pool a pixel field by ``factor``; the values scale by ``1 / factor``."""
    _check_field(field)
    return F.avg_pool2d(field.float(), factor) / factor


def resize(field: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a pixel field to ``size = (H', W')``, scaling dy and dx by the ratios."""
    _check_field(field)
    h, w = field.shape[-2:]
    with torch.autocast(field.device.type, enabled=False):
        out = F.interpolate(field.float(), size=size, mode="bilinear", align_corners=False)
    scale = torch.tensor([size[0] / h, size[1] / w], device=field.device).view(1, 2, 1, 1)
    return out * scale


def invert(field: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """The field ``v`` with ``compose(v, field) == 0``: warping by ``field`` then by ``v`` is
    the identity, i.e. ``v(x) = -field(x + v(x))``.

    Solved by fixed-point iteration from ``v = -field``; it converges where the field is
    smooth (Lipschitz constant below 1, i.e. no folds).

    Parameters
    ----------
    field : Tensor, shape (N, 2, H, W), pixels
    iterations : int
        Fixed-point steps.

    Returns
    -------
    Tensor, shape (N, 2, H, W), float32
    """
    _check_field(field)
    v = -field.float()
    for _ in range(iterations):
        v = -warp(field, v, padding="border")
    return v


def jacobian_determinant(field: torch.Tensor) -> torch.Tensor:
    """``det(I + grad D)`` per pixel by central differences (one-sided at the border).

    The map ``x -> x + D(x)`` keeps orientation where this is positive; where it is <= 0 the
    field folds (two target pixels read the same source point, in reversed order).

    Returns
    -------
    Tensor, shape (N, H, W), float32
    """
    _check_field(field)
    f = field.float()
    dy = torch.gradient(f, dim=2)  # d/dy of (dy, dx)
    dx = torch.gradient(f, dim=3)
    dyy, dxy = dy[0][:, 0], dy[0][:, 1]  # d(dy)/dy, d(dx)/dy
    dyx, dxx = dx[0][:, 0], dx[0][:, 1]  # d(dy)/dx, d(dx)/dx
    return (1.0 + dyy) * (1.0 + dxx) - dyx * dxy


def fold_fraction(field: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """Fraction of (valid) pixels where the field folds (``det(I + grad D) <= 0``)."""
    det = jacobian_determinant(field)
    folded = det <= 0
    if valid is not None:
        keep = valid.reshape(det.shape).bool()
        return float(folded[keep].float().mean()) if keep.any() else 0.0
    return float(folded.float().mean())


def translation(dy: float, dx: float, height: int, width: int, batch: int = 1) -> torch.Tensor:
    """A constant field ``(batch, 2, H, W)`` that reads every pixel ``(dy, dx)`` away."""
    field = torch.empty(batch, 2, height, width, dtype=torch.float32)
    field[:, 0], field[:, 1] = dy, dx
    return field


def rotate180(field: torch.Tensor) -> torch.Tensor:
    """The field of the 180-degree rotated pair: ``-field`` rotated by 180 degrees in space.

    If ``D`` aligns source to target, ``rotate180(D)`` aligns ``rot180(source)`` to
    ``rot180(target)`` (both vector components flip sign).
    """
    _check_field(field)
    return -torch.flip(field, dims=(2, 3))


__all__ = [
    "PADDINGS",
    "compose",
    "downsample",
    "fold_fraction",
    "identity_grid",
    "invert",
    "jacobian_determinant",
    "resize",
    "rotate180",
    "to_grid",
    "translation",
    "upsample",
    "warp",
]

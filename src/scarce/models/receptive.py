"""Receptive fields: exact 1-D windows propagated through a layer graph, and a measurement.

A network's receptive field decides its halo (the context a tile needs on each side for a
seamless sliding window) and the smallest sensible patch. The analytic functions here compose
per-layer windows (:func:`window_conv`, :func:`window_pool`, ...); :func:`measure_receptive_field`
checks them against the gradient of one output pixel.

References
----------
.. [1] A. Araujo, W. Norris, J. Sim, "Computing Receptive Fields of Convolutional Neural
   Networks", Distill 2019. doi:10.23915/distill.00021
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import cache

import numpy as np
import torch
from torch import nn

# 1-D receptive windows: a window maps a position on a feature map to the (first, last)
# input pixel that can reach it. Each layer type turns the window of its input into the
# window of its output; caching keeps the recursion linear in the number of layers.

Window = Callable[[int], tuple[int, int]]


def window_identity(x: int) -> tuple[int, int]:
    return (x, x)


def window_conv(window: Window, count: int = 1) -> Window:
    """Window after ``count`` 3x3 (stride 1, ``same``) convolutions."""
    for _ in range(count):
        window = (lambda w: cache(lambda x: (w(x - 1)[0], w(x + 1)[1])))(window)
    return window


def window_pool(window: Window) -> Window:
    """Window after a 2x2 stride-2 pooling: coarse pixel m reads fine pixels 2m and 2m+1."""
    return cache(lambda m: (window(2 * m)[0], window(2 * m + 1)[1]))


def window_upsample(window: Window, mode: str) -> Window:
    """Window after x2 up-sampling: ``transpose`` (2x2 stride 2), ``unpool`` or ``bilinear``.

    A 2x2 stride-2 transposed convolution and max-unpooling give fine pixel x the coarse
    pixel ``x // 2``; bilinear interpolation (align_corners=False) reads ``(x - 1) // 2``
    and ``(x + 1) // 2``.
    """
    if mode == "bilinear":
        return cache(lambda x: (window((x - 1) // 2)[0], window((x + 1) // 2)[1]))
    return cache(lambda x: window(x // 2))


def window_union(a: Window, b: Window) -> Window:
    """Window after concatenating two feature maps of the same size."""
    return cache(lambda x: (min(a(x)[0], b(x)[0]), max(a(x)[1], b(x)[1])))


def window_extent(window: Window, period: int) -> int:
    """Largest window size, pixels, over output positions ``0 .. period - 1``."""
    return max(window(x)[1] - window(x)[0] + 1 for x in range(period))


def _drop_input_statistics(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with GroupNorm/InstanceNorm replaced by identities."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.GroupNorm | nn.InstanceNorm2d):
                setattr(parent, child_name, nn.Identity())
    return model


def measure_receptive_field(
    model: nn.Module,
    in_channels: int,
    size: int | None = None,
    *,
    rng: np.random.Generator | None = None,
    all_phases: bool = False,
) -> int:
    """Receptive field measured by gradients: the input extent that reaches one output pixel.

    The summed class logits of the centre output pixel are differentiated with respect to a
    random input ``(1, C, size, size)``, uniform in [0, 1); the receptive field is the
    larger of the height and width of the bounding box of the input pixels with a non-zero
    gradient. The model is put in eval mode (dropout off, batch-norm running statistics)
    on a copy in which group and instance normalisation become identities: they normalise
    with statistics of the whole input, which would make every output pixel depend
    (weakly) on every input pixel and hide the convolutional context the halo stands for.
    The model passed in is not modified.

    Parameters
    ----------
    model : torch.nn.Module
        Network mapping ``(N, C, H, W)`` to ``(N, K, H, W)``.
    in_channels : int
        Input channels C.
    size : int, optional
        Input side, pixels. Default: the smallest multiple of ``model.size_multiple`` that
        is at least ``model.receptive_field + 2 * model.size_multiple``, so the window fits.
    rng : numpy.random.Generator, optional
        Source of the random input; default ``numpy.random.default_rng(0)``.
    all_phases : bool, default False
        Also measure the pixels ``centre + (d, d)`` for ``d < size_multiple`` and return the
        largest value: the window depends on the pixel's position modulo ``size_multiple``.

    Returns
    -------
    int
        Measured receptive field, pixels. It is at most the analytic one: max-pooling
        passes gradients to the arg-max only, and ReLUs cut paths.

    Raises
    ------
    ValueError
        If ``size`` is None and ``model`` has no ``receptive_field`` attribute, or ``size``
        is not a positive integer.

    References
    ----------
    .. [1] NIST semantic-segmentation-unet (usnistgov, GitHub), which derives its tile halo
       from the gradient of an output pixel with respect to the input.
    .. [2] W. Luo, Y. Li, R. Urtasun, R. Zemel, "Understanding the Effective Receptive Field
       in Deep Convolutional Neural Networks", NeurIPS 2016. arXiv:1701.04128
    """
    multiple = int(getattr(model, "size_multiple", 1))
    if size is None:
        if not hasattr(model, "receptive_field"):
            raise ValueError("model has no receptive_field attribute; pass size= explicitly")
        needed = int(model.receptive_field) + 2 * multiple
        size = -(-needed // multiple) * multiple
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer (pixels), got {size!r}")
    rng = np.random.default_rng(0) if rng is None else rng
    probe = _drop_input_statistics(model).eval()
    first = next(probe.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    image = rng.random((1, in_channels, size, size), dtype=np.float32)
    x = torch.from_numpy(image).to(device).requires_grad_(True)
    out = probe(x)
    offsets = range(multiple) if all_phases else range(1)
    best = 0
    for d in offsets:
        r = min(size // 2 + d, size - 1)
        (grad,) = torch.autograd.grad(out[0, :, r, r].sum(), x, retain_graph=True)
        hit = grad.abs().sum(dim=(0, 1)) > 0  # (size, size)
        rows = torch.nonzero(hit.any(dim=1)).flatten()
        cols = torch.nonzero(hit.any(dim=0)).flatten()
        if rows.numel():
            extent = max(int(rows[-1] - rows[0]) + 1, int(cols[-1] - cols[0]) + 1)
            best = max(best, extent)
    return best

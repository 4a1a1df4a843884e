"""Sliding-window inference: logits of an image of any size from overlapping, blended tiles.

An image is padded by reflection, cut into overlapping tiles on a regular grid, the tiles run
through the network in batches, and their logits are blended with a Gaussian (or constant)
weight into one float32 accumulator per class, then cropped back. Tiles are aligned to the
network's ``size_multiple`` and each tile only contributes where its output has full context
(``model.halo`` pixels, rounded up to whole ``size_multiple`` cells, away from its inner
edges), so when the overlap is at least twice that margin plus ``size_multiple`` the tiled
logits equal whole-image inference up to float rounding (measured: <= 1e-7 on real images).

Exactness needs a network whose output is translation-equivariant in steps of
``size_multiple``: batch norm in eval mode is, per-sample normalisation (``norm="instance"``
or ``"group"``) is not (its statistics change with the tile), so those models give close but
not equal results. Checkpoint-level prediction (normalisation, TTA, files) is in
:mod:`scarce.segment.predict`.
"""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from scarce.config import CHOICES
from scarce.errors import InputError

logger = logging.getLogger(__name__)

BLENDS = CHOICES["predict.blend"]
ACCUMULATE = ("auto", "cpu", "device")
GAUSSIAN_FLOOR = 1e-3  # floor of the 1D Gaussian weight, so the 2D weight is >= 1e-6
TILE_BAR_MIN = 16  # images with at least this many tiles get a progress bar over tiles

_warned: set[tuple] = set()  # (tile, overlap, margin, needed) already warned about


def tile_starts(size: int, tile: int, overlap: float, multiple: int = 1) -> list[int]:
    """Start offsets of tiles along one axis: a regular grid, the last tile flush with the end.

    Parameters
    ----------
    size : int
        Axis length of the padded image, pixels; ``>= tile`` and a multiple of ``multiple``.
    tile : int
        Tile side, pixels; a multiple of ``multiple``.
    overlap : float
        Wanted fraction of the tile shared by neighbours, in ``[0, 1)``. The step is at most
        ``tile * (1 - overlap)`` before rounding to ``multiple``, so the real overlap can be
        smaller by up to ``multiple`` pixels.
    multiple : int
        Every start is a multiple of this (the network's ``size_multiple``), pixels.

    Returns
    -------
    list of int
        Increasing starts, first 0, last ``size - tile``.

    References
    ----------
    Isensee F. et al. "nnU-Net: a self-configuring method for deep learning-based biomedical
    image segmentation." Nature Methods 18:203-211 (2021). doi:10.1038/s41592-020-01008-z
    (``compute_steps_for_sliding_window``).
    """
    assert size >= tile and size % multiple == 0 and tile % multiple == 0
    units, tile_units = size // multiple, tile // multiple
    if units == tile_units:
        return [0]
    step = max(1.0, tile_units * (1.0 - overlap))
    count = math.ceil((units - tile_units) / step) + 1
    actual = (units - tile_units) / (count - 1)
    return [int(round(i * actual)) * multiple for i in range(count)]


def _axis_weights(size, tile, starts, margin, blend):
    """Per-tile 1D weights ``(tile,)`` and their sum over tiles ``(size,)`` along one axis."""
    if blend == "gaussian":
        i = torch.arange(tile, dtype=torch.float64)
        g = torch.exp(-0.5 * ((i - (tile - 1) / 2) / (tile / 8)) ** 2)
        base = (g / g.max()).clamp_min(GAUSSIAN_FLOOR).float()
    else:
        base = torch.ones(tile)
    weights, total = [], torch.zeros(size)
    for s in starts:
        w = base.clone()
        if s > 0:
            w[:margin] = 0  # inner edge: no full context there
        if s + tile < size:
            w[tile - margin :] = 0
        weights.append(w)
        total[s : s + tile] += w
    return weights, total


def _pad_reflect(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad ``(C, H, W)`` at the bottom/right to ``(C, height, width)`` by reflection.

    numpy's ``reflect`` repeats the reflection when the pad exceeds the image (a 20-px image
    padded to 256 px stays continuous); 1-px axes, which cannot reflect, use ``symmetric``.
    """
    c, h, w = image.shape
    if (h, w) == (height, width):
        return image
    widths = [(0, 0), (0, height - h), (0, width - w)]
    mode = "reflect" if min(h, w) > 1 else "symmetric"  # reflect needs 2+ pixels
    return torch.from_numpy(np.pad(image.numpy(), widths, mode=mode))


def _check_window_args(model, image, tile_size, overlap, blend, batch_size):
    """Validate :func:`sliding_window_logits` arguments; the unwrapped net and a float image."""
    if not isinstance(image, torch.Tensor | np.ndarray):  # (C, H, W) float, not modified
        raise TypeError(f"image must be a numpy array or tensor (C, H, W), got {type(image)}")
    if image.ndim != 3 or 0 in image.shape:
        raise ValueError(
            f"image must be a non-empty (C, H, W) array, got shape {tuple(image.shape)}; "
            "add a channel axis for 2D images"
        )
    image = torch.as_tensor(image).detach().cpu()
    if not image.is_floating_point():
        raise TypeError(
            f"image must be a normalised float array, got {image.dtype}; "
            "normalise it first (scarce.data.normalize.normalize) or use predict_image"
        )
    net = getattr(model, "module", model)  # unwrap DDP
    in_channels = getattr(net, "in_channels", image.shape[0])
    if image.shape[0] != in_channels:
        raise InputError(f"image has {image.shape[0]} channel(s), the model takes {in_channels}")
    if int(tile_size) < 1:
        raise InputError(f"tile_size must be >= 1 pixel, got {tile_size}")
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap must be in [0, 1), got {overlap}")
    if blend not in BLENDS:
        raise InputError(f"blend must be one of {BLENDS}, got {blend!r}")
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    return net, image.float()


def _tile_plan(net, h: int, w: int, tile_size: int, overlap: float):
    """Tile side, padded (height, width), (starts_y, starts_x) and inner-edge margin, pixels.

    Logs a warning (once per setting) when the overlap is too small for exact results.
    """
    multiple = int(getattr(net, "size_multiple", 1))
    halo = int(getattr(net, "halo", 0))
    tile = -(-int(tile_size) // multiple) * multiple
    sizes = tuple(max(tile, -(-n // multiple) * multiple) for n in (h, w))
    starts = tuple(tile_starts(size, tile, overlap, multiple) for size in sizes)
    # tile edges sit on the pooling grid and a pixel's context depends on its phase in it,
    # so the margin is the halo rounded up to whole grid cells
    needed = -(-halo // multiple) * multiple
    overlaps = [a + tile - b for st in starts for a, b in zip(st, st[1:])]
    margin = min([needed] + [o // 2 for o in overlaps])
    key = (tile, overlap, margin, needed)
    if margin < needed and key not in _warned:
        _warned.add(key)
        logger.warning(
            "tiles of %d px with overlap %.2f (%d px) leave a context margin of %d px, less "
            "than the %d px the model needs (halo %d px): tiled logits differ slightly from "
            "whole-image ones near tile seams; use an overlap of >= %d px for exact results",
            tile,
            overlap,
            min(overlaps),
            margin,
            needed,
            halo,
            2 * needed + multiple,
        )
    return tile, sizes, starts, margin


def accumulator_device(device: torch.device, nbytes: int, accumulate: str) -> torch.device:
    """Where the ``(K, H, W)`` accumulator lives: the compute device, or the CPU.

    ``accumulate="auto"`` keeps it on a CUDA device only while it takes at most half of the
    device's free memory (a 40,000 x 25,000 slide with 3 classes needs 12 GB), else on the
    CPU, where each batch of tile logits is copied; ``"cpu"`` and ``"device"`` force one.
    """
    if accumulate == "cpu" or device.type == "cpu":
        return torch.device("cpu")
    if accumulate == "device":
        return device
    free, _ = torch.cuda.mem_get_info(device) if device.type == "cuda" else (nbytes * 2, 0)
    return device if nbytes <= free // 2 else torch.device("cpu")


def _accumulate(model, padded, tile, grid, batch_size, device, bar, accumulate):
    """Sum of ``logits * weight`` over the tiles of ``grid``, ``(K, Hp, Wp)`` float32.

    ``grid`` holds ``((y, weight_y), (x, weight_x))`` per tile; only one batch of tiles and
    one 2D weight per tile exist at a time. Returns the accumulator and its device.
    """
    acc = where = None
    for b in range(0, len(grid), batch_size):
        chunk = grid[b : b + batch_size]
        batch = torch.stack([padded[:, y : y + tile, x : x + tile] for (y, _), (x, _) in chunk])
        out = model(batch.to(device)).float()  # (B, K, tile, tile)
        if acc is None:
            nbytes = 4 * out.shape[1] * padded.shape[1] * padded.shape[2]
            where = accumulator_device(device, nbytes, accumulate)
            acc = torch.zeros((out.shape[1], *padded.shape[1:]), device=where)
        out = out.to(where)
        for ((y, wy), (x, wx)), logits in zip(chunk, out):
            acc[:, y : y + tile, x : x + tile] += logits * (wy[:, None] * wx[None, :]).to(where)
        bar.update(len(chunk))
    return acc, where


def sliding_window_logits(
    model,
    image,
    *,
    tile_size: int,
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 4,
    device=None,
    progress: bool = False,
    accumulate: str = "auto",
) -> torch.Tensor:
    """Logits of a whole image from overlapping tiles, blended and cropped back.

    Parameters
    ----------
    model : torch.nn.Module
        Used as given (the caller sets eval mode); maps ``(N, C, h, w)`` to ``(N, K, h, w)``.
        Its ``size_multiple`` (default 1) and ``halo`` (pixels, default 0) are read.
    image : ndarray or Tensor, shape (C, H, W), float
        Normalised image; any H, W >= 1 (also smaller than a tile). Not modified.
    tile_size : int
        Tile side, pixels; rounded up to a multiple of ``model.size_multiple``.
    overlap : float
        Fraction of the tile shared by neighbouring tiles, in ``[0, 1)``. Exact equality with
        whole-image inference needs an overlap of at least ``2 * margin + size_multiple``
        pixels, ``margin = ceil(halo / size_multiple) * size_multiple`` (the grid rounding can
        cost one ``size_multiple``); smaller overlaps log a warning (once per setting).
    blend : {"gaussian", "constant"}
        Gaussian importance weight (sigma = tile / 8, floored at 1e-6) or plain averaging.
    batch_size : int
        Tiles per forward pass; only one batch of tiles exists at a time.
    device : torch.device or str, optional
        Where the network runs; default: the device of the model's parameters.
    progress : bool
        Show a progress bar over tiles (for images with many tiles, on a terminal).
    accumulate : {"auto", "cpu", "device"}
        Where the blended ``(K, H, W)`` float32 sum lives (:func:`accumulator_device`):
        on a small GPU, ``auto`` keeps it in CPU memory and copies each batch of logits.

    Returns
    -------
    Tensor, shape (K, H, W), float32, on CPU

    Raises
    ------
    TypeError
        If ``image`` is not a float array or tensor.
    ValueError
        For a wrong shape, a channel count the model does not take, or bad options.

    Notes
    -----
    The image is padded at the bottom and right by reflection to at least one tile and to a
    multiple of ``size_multiple``; tile starts are multiples of ``size_multiple`` (so pooling
    grids line up with whole-image inference). Weights are zeroed in a margin of
    ``min(margin, smallest overlap // 2)`` pixels along tile edges inside the padded image
    (the overlap-tile strategy; the cap keeps every pixel covered), logits * weight are
    summed in one float32 ``(K, H, W)`` accumulator, and divided by the summed weights, a
    separable product of per-axis sums. A single tile covering the padded image gives
    exactly (bit for bit) the whole-image result of the padded image.

    References
    ----------
    Ronneberger O., Fischer P., Brox T. "U-Net: Convolutional networks for biomedical image
    segmentation." MICCAI 2015, LNCS 9351:234-241. doi:10.1007/978-3-319-24574-4_28
    (overlap-tile strategy, mirrored borders).
    Isensee F. et al. "nnU-Net." Nature Methods 18:203-211 (2021).
    doi:10.1038/s41592-020-01008-z (tile grid, Gaussian importance weighting).
    """
    net, image = _check_window_args(model, image, tile_size, overlap, blend, batch_size)
    if accumulate not in ACCUMULATE:
        raise InputError(f"accumulate must be one of {ACCUMULATE}, got {accumulate!r}")
    if device is None:
        param = next(net.parameters(), None)
        device = param.device if param is not None else "cpu"
    device = torch.device(device)
    _, h, w = image.shape
    tile, (size_h, size_w), (starts_y, starts_x), margin = _tile_plan(net, h, w, tile_size, overlap)
    padded = _pad_reflect(image, size_h, size_w)
    if len(starts_y) == len(starts_x) == 1:
        blend = "constant"  # one tile: weights of 1 keep its logits bit for bit
    wy, total_y = _axis_weights(size_h, tile, starts_y, margin, blend)
    wx, total_x = _axis_weights(size_w, tile, starts_x, margin, blend)
    grid = list(itertools.product(zip(starts_y, wy), zip(starts_x, wx)))
    show = progress and len(grid) >= TILE_BAR_MIN
    bar = tqdm(
        total=len(grid), desc="tiles", unit="tile", leave=False, disable=None if show else True
    )
    with torch.inference_mode(), bar:
        acc, where = _accumulate(
            model, padded, tile, grid, int(batch_size), device, bar, accumulate
        )
        total = (total_y[:h, None] * total_x[None, :w]).to(where)  # (H, W) sum of weights
        return (acc[:, :h, :w] / total).cpu()


__all__ = ["BLENDS", "accumulator_device", "sliding_window_logits", "tile_starts"]

"""Sliding-window prediction: a checkpoint and images of any size to class maps and instances.

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
not equal results.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential, watershed
from tqdm.auto import tqdm

from scarce.checkpoint import load_model
from scarce.io import (
    IMAGE_EXTENSIONS,
    ImageFileError,
    list_image_files,
    read_image,
    stem_of,
    write_float_image,
    write_label_image,
)
from scarce.normalize import normalize

logger = logging.getLogger(__name__)

BLENDS = ("gaussian", "constant")
GAUSSIAN_FLOOR = 1e-3  # floor of the 1D Gaussian weight, so the 2D weight is >= 1e-6
TILE_BAR_MIN = 16  # images with at least this many tiles get a progress bar over tiles


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Turn a device name into a :class:`torch.device`.

    Parameters
    ----------
    name : {"auto", "cpu", "cuda", "cuda:N"} or torch.device or None
        ``"auto"`` (or ``None``) picks ``cuda`` when available, else ``cpu``.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        For an unknown name, or when CUDA is asked for but not available (or the index is
        out of range).
    """
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} asked for, but CUDA is not available here "
                "(CPU-only torch or no GPU); use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


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
            "normalise it first (scarce.normalize.normalize) or use predict_image"
        )
    net = getattr(model, "module", model)  # unwrap DDP
    in_channels = getattr(net, "in_channels", image.shape[0])
    if image.shape[0] != in_channels:
        raise ValueError(f"image has {image.shape[0]} channel(s), the model takes {in_channels}")
    if int(tile_size) < 1:
        raise ValueError(f"tile_size must be >= 1 pixel, got {tile_size}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return net, image.float()


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
    batch_size = int(batch_size)
    if device is None:
        param = next(net.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    _, h, w = image.shape
    tile, (size_h, size_w), (starts_y, starts_x), margin = _tile_plan(net, h, w, tile_size, overlap)
    padded = _pad_reflect(image, size_h, size_w)
    if len(starts_y) == len(starts_x) == 1:
        blend = "constant"  # one tile: weights of 1 keep its logits bit for bit
    wy, total_y = _axis_weights(size_h, tile, starts_y, margin, blend)
    wx, total_x = _axis_weights(size_w, tile, starts_x, margin, blend)
    grid = [(i, j) for i in range(len(starts_y)) for j in range(len(starts_x))]
    acc = None
    show = progress and len(grid) >= TILE_BAR_MIN
    bar = tqdm(
        total=len(grid), desc="tiles", unit="tile", leave=False, disable=None if show else True
    )
    with torch.inference_mode(), bar:
        for b in range(0, len(grid), batch_size):
            chunk = [
                (starts_y[i], starts_x[j], wy[i][:, None] * wx[j][None, :])
                for i, j in grid[b : b + batch_size]
            ]
            batch = torch.stack([padded[:, y : y + tile, x : x + tile] for y, x, _ in chunk])
            out = model(batch.to(device)).float()  # (B, K, tile, tile)
            if acc is None:
                acc = torch.zeros((out.shape[1], size_h, size_w), device=device)
            for (y, x, weight), logits in zip(chunk, out):
                acc[:, y : y + tile, x : x + tile] += logits * weight.to(device)
            bar.update(len(chunk))
        total = (total_y[:h, None] * total_x[None, :w]).to(device)  # (H, W) sum of weights
        return (acc[:, :h, :w] / total).cpu()


_warned: set[tuple] = set()


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


def _dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Rotate ``(C, H, W)`` by ``k`` quarter turns, then flip left-right if ``flip``."""
    x = torch.rot90(x, k, dims=(1, 2))
    return torch.flip(x, dims=(2,)) if flip else x


def _undo_dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Inverse of :func:`_dihedral`."""
    x = torch.flip(x, dims=(2,)) if flip else x
    return torch.rot90(x, -k, dims=(1, 2))


def _predict_options(ckpt: dict, **given) -> dict:
    """Prediction options: the given ones, else ``ckpt["config"]["predict"]``, else defaults."""
    from scarce.config import PredictConfig

    stored = {**vars(PredictConfig()), **ckpt.get("config", {}).get("predict", {})}
    opts = {k: stored[k] if v is None else v for k, v in given.items()}
    if "tile_size" in opts and not opts["tile_size"]:
        patch = ckpt.get("config", {}).get("data", {}).get("patch_size", 256)
        opts["tile_size"] = 2 * int(patch)
    return opts


def check_channels(image_channels: int, ckpt: dict, name: str = "image") -> None:
    """Raise a ValueError if an image's channel count is not the model's.

    Raises
    ------
    ValueError
        Naming both counts and how to fix it.
    """
    expected = int(ckpt["model"]["in_channels"])
    if image_channels != expected:
        raise ValueError(
            f"{name} has {image_channels} channel(s) but the model was trained on "
            f"{expected}-channel images; convert the images to {expected} channel(s) "
            "(e.g. grayscale <-> RGB) or use a model trained on such images"
        )


def predict_image(
    model,
    image,
    ckpt: dict,
    *,
    tile_size: int | None = None,
    overlap: float | None = None,
    blend: str | None = None,
    tta: bool | None = None,
    batch_size: int | None = None,
    device=None,
    progress: bool = False,
) -> torch.Tensor:
    """Class probabilities of one raw image: normalise, sliding window, softmax (+ TTA).

    Parameters
    ----------
    model : torch.nn.Module
        In eval mode (e.g. from :func:`scarce.checkpoint.load_model`).
    image : ndarray, shape (C, H, W)
        Raw image as :func:`scarce.io.read_image` returns it (any supported dtype).
    ckpt : dict
        The checkpoint: ``model.in_channels``, ``normalization`` and ``config.predict`` are
        read.
    tile_size, overlap, blend, tta, batch_size : optional
        Override ``ckpt["config"]["predict"]``; see :func:`sliding_window_logits`.
        ``tile_size`` 0 means twice the training patch size, pixels.
    device : torch.device or str, optional
        Default: the model's device.
    progress : bool
        Progress bar over tiles for big images.

    Returns
    -------
    Tensor, shape (K, H, W), float32, on CPU
        Softmax of the blended logits; with TTA the mean of the softmax over the 8 dihedral
        transforms (4 quarter turns x optional flip), each undone before averaging. Rotations
        matter as much as flips for microscopy (no preferred orientation), so all 8 are used
        (8x the cost).

    Raises
    ------
    ValueError
        If the image's channel count is not the model's (names both and how to fix).

    References
    ----------
    Isensee F. et al. "nnU-Net." Nature Methods 18:203-211 (2021).
    doi:10.1038/s41592-020-01008-z (mirroring test-time augmentation).
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(
            f"image must be (C, H, W) as read by scarce.io.read_image, got shape {image.shape}"
        )
    check_channels(image.shape[0], ckpt)
    opts = _predict_options(
        ckpt, tile_size=tile_size, overlap=overlap, blend=blend, tta=tta, batch_size=batch_size
    )
    x = torch.from_numpy(np.ascontiguousarray(normalize(image, ckpt["normalization"])))
    kwargs = dict(
        tile_size=opts["tile_size"],
        overlap=opts["overlap"],
        blend=opts["blend"],
        batch_size=opts["batch_size"],
        device=device,
        progress=progress,
    )
    if not opts["tta"]:
        return torch.softmax(sliding_window_logits(model, x, **kwargs), dim=0)
    probs = None
    for k in range(4):
        for flip in (False, True):
            logits = sliding_window_logits(model, _dihedral(x, k, flip).contiguous(), **kwargs)
            p = _undo_dihedral(torch.softmax(logits, dim=0), k, flip)
            probs = p if probs is None else probs.add_(p)
    return probs / 8


def instances_from_prediction(
    probabilities, target: str, *, min_object_size: int = 0
) -> np.ndarray:
    """Instance labels from class probabilities.

    Parameters
    ----------
    probabilities : ndarray or Tensor, shape (K, H, W), float
        Per-class probabilities (or any scores whose argmax is the class map).
    target : {"semantic", "class", "boundary"}
        How the model's classes were made (``ckpt["target"]``). ``semantic``/``class``:
        instances are the 4-connected components of the foreground (argmax > 0); with more
        than 2 classes all foreground classes count as one foreground (touching objects of
        different classes merge). ``boundary`` (0 background, 1 interior, 2 boundary): seeds
        are the 4-connected components of the interior (argmax == 1), grown by a watershed
        on ``1 - p_interior`` within the foreground (argmax != 0), so boundary pixels go to
        the nearest-in-flooding seed and touching objects stay apart.
    min_object_size : int
        Objects with fewer pixels than this are removed (set to 0), pixels.

    Returns
    -------
    ndarray, shape (H, W), int32
        0 = background, objects numbered 1..N.

    Raises
    ------
    ValueError
        For a wrong shape, an unknown target, or a ``boundary`` target without 3 classes.

    References
    ----------
    Beucher S., Meyer F. "The morphological approach to segmentation: the watershed
    transformation." Mathematical Morphology in Image Processing (1993) 433-481;
    scikit-image ``segmentation.watershed``. Seeded interior/boundary post-processing as in
    Caicedo J.C. et al. Cytometry A 95:952-965 (2019). doi:10.1002/cyto.a.23863
    """
    probs = torch.as_tensor(probabilities).detach().cpu().float().numpy()
    if probs.ndim != 3 or probs.shape[0] < 2:
        raise ValueError(f"probabilities must be (K, H, W) with K >= 2, got {probs.shape}")
    if target not in ("semantic", "class", "boundary"):
        raise ValueError(f"target must be semantic, class or boundary, got {target!r}")
    classes = probs.argmax(0)
    if target == "boundary":
        if probs.shape[0] != 3:
            raise ValueError(
                f"target 'boundary' needs 3 classes (background, interior, "
                f"boundary), got {probs.shape[0]}"
            )
        seeds, _ = ndi.label(classes == 1)
        labels = watershed(1.0 - probs[1], markers=seeds, mask=classes != 0)
    else:
        labels, _ = ndi.label(classes > 0)
    if min_object_size > 0:
        sizes = np.bincount(labels.ravel())
        labels[sizes[labels] < min_object_size] = 0
    return relabel_sequential(labels.astype(np.int32))[0]


def _collect_images(images) -> list[Path]:
    """Image files from a folder or a single file (errors before any work)."""
    path = Path(images)
    if path.is_dir():
        files = list_image_files(path)
        if not files:
            raise FileNotFoundError(
                f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder"
            )
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file or folder")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(
            f"{path}: unsupported image format {path.suffix!r}; supported: "
            f"{', '.join(IMAGE_EXTENSIONS)}"
        )
    return [path]


def _check_all(files: list[Path], ckpt: dict) -> None:
    """Read every image once and raise one error listing every problem (channels, files)."""
    problems, seen = [], {}
    for file in files:
        if stem_of(file) in seen:
            problems.append(f"{file}: same stem as {seen[stem_of(file)]}; outputs would clash")
        seen[stem_of(file)] = file
        try:
            check_channels(read_image(file).shape[0], ckpt, name=str(file))
        except (ImageFileError, ValueError) as exc:
            problems.append(str(exc))
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
            f"{len(problems)} of {len(files)} image(s) cannot be predicted:\n  {shown}{more}"
        )


def _make_out_dir(out_dir) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as exc:
        raise ValueError(
            f"cannot create output folder {out} ({exc}); choose another --out"
        ) from exc
    if not os.access(out, os.W_OK):
        raise ValueError(f"output folder {out} is not writable; choose another --out")
    return out


def predict_files(
    model_path,
    images,
    out_dir,
    *,
    tile_size: int | None = None,
    overlap: float | None = None,
    blend: str | None = None,
    tta: bool | None = None,
    probabilities: bool = False,
    instances: bool = False,
    batch_size: int | None = None,
    device: str = "auto",
    fmt: str = "tif",
    progress: bool = True,
) -> list[dict]:
    """Predict every image of a folder (or one file) and write class maps beside their stems.

    Parameters
    ----------
    model_path : path-like
        A checkpoint file or a run folder (``checkpoints/best.pt``, else ``last.pt``).
    images : path-like
        A folder (not recursive) or a single TIFF/PNG/JPEG/BMP file.
    out_dir : path-like
        Created if missing. Writes ``<stem>.<fmt>`` (argmax class map ``(H, W)``, smallest
        unsigned dtype), with ``probabilities`` also ``<stem>_prob.tif`` (float32
        ``(K, H, W)``), with ``instances`` also ``<stem>_instances.tif`` (labels ``(H, W)``).
    tile_size, overlap, blend, tta, batch_size : optional
        See :func:`predict_image`; default from the checkpoint's config.
    device : {"auto", "cpu", "cuda", "cuda:N"}
        See :func:`resolve_device`.
    fmt : {"tif", "png"}
        Class map format.
    progress : bool
        Progress bars over images (and tiles of big images); off when not on a terminal.

    Returns
    -------
    list of dict
        One per image: ``image``, ``class_map``, ``probabilities`` and ``instances`` (paths as
        str, or None), ``shape`` ``(H, W)`` and ``seconds`` (wall time).

    Raises
    ------
    FileNotFoundError
        If ``images`` does not exist or holds no image.
    ValueError
        Before any prediction: a bad ``fmt``, an output folder that cannot be made, or (one
        error listing all) unreadable images, images whose channel count is not the model's,
        or two images with the same stem.
    scarce.checkpoint.CheckpointError
        For a missing or invalid checkpoint.
    """
    if fmt not in ("tif", "png"):
        raise ValueError(f"fmt must be 'tif' or 'png', got {fmt!r}")
    files = _collect_images(images)
    out = _make_out_dir(out_dir)
    model, ckpt = load_model(model_path, resolve_device(device))
    _check_all(files, ckpt)
    min_size = _predict_options(ckpt, min_object_size=None)["min_object_size"]
    results = []
    for file in tqdm(files, desc="images", unit="image", disable=None if progress else True):
        start = time.perf_counter()
        image = read_image(file)
        probs = predict_image(
            model,
            image,
            ckpt,
            tile_size=tile_size,
            overlap=overlap,
            blend=blend,
            tta=tta,
            batch_size=batch_size,
            progress=progress,
        )
        stem = stem_of(file)
        row = {
            "image": str(file),
            "probabilities": None,
            "instances": None,
            "shape": tuple(image.shape[1:]),
        }
        row["class_map"] = str(write_label_image(out / f"{stem}.{fmt}", probs.argmax(0).numpy()))
        if probabilities:
            row["probabilities"] = str(write_float_image(out / f"{stem}_prob.tif", probs.numpy()))
        if instances:
            labels = instances_from_prediction(
                probs, ckpt.get("target", "semantic"), min_object_size=min_size
            )
            row["instances"] = str(write_label_image(out / f"{stem}_instances.tif", labels))
        row["seconds"] = time.perf_counter() - start
        logger.info("%s: %dx%d in %.2f s", file.name, *row["shape"], row["seconds"])
        results.append(row)
    return results

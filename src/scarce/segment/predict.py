"""Prediction from a checkpoint: raw images of any size to class maps, probabilities, instances.

:func:`predict_image` normalises an image with the checkpoint's statistics and runs the
sliding window of :mod:`scarce.engine.tiling`, optionally over the 8 dihedral
transforms; :func:`instances_from_prediction` turns probabilities into objects;
:func:`predict_files` does both for a folder and writes the results beside the image stems.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential, watershed
from tqdm.auto import tqdm

from scarce import atomic
from scarce.config import PredictConfig
from scarce.data.datasetyaml import read_dataset_metadata
from scarce.data.drift import warn_if_unusual
from scarce.data.normalize import normalize
from scarce.engine.checkpoint import load_model
from scarce.engine.distributed import resolve_device
from scarce.engine.tiling import sliding_window_logits
from scarce.errors import InputError, MissingInputError
from scarce.io import (
    IMAGE_EXTENSIONS,
    ImageFileError,
    list_image_files,
    read_image,
    stem_of,
    write_float_image,
    write_label_image,
)
from scarce.segment.scale import downscale_image, relative_factor, upsample_logits
from scarce.segment.task import target_of

logger = logging.getLogger(__name__)


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
    stored = {**vars(PredictConfig()), **ckpt.get("config", {}).get("predict", {})}
    opts = {k: stored[k] if v is None else v for k, v in given.items()}
    if "tile_size" in opts and not opts["tile_size"]:
        patch = ckpt.get("config", {}).get("data", {}).get("patch_size", 256)
        opts["tile_size"] = 2 * int(patch)
    return opts


def check_channels(image_channels: int, ckpt: dict, name: str = "image") -> None:
    """Raise an InputError if an image's channel count is not the model's.

    Parameters
    ----------
    image_channels : int
        C of the image ``(C, H, W)``.
    ckpt : dict
        The checkpoint; ``ckpt["model"]["arguments"]["in_channels"]`` is the model's count.
    name : str
        What to call the image in the message (e.g. its path).

    Raises
    ------
    InputError
        Naming both counts and how to fix it.
    """
    expected = int(ckpt["model"]["arguments"]["in_channels"])
    if image_channels != expected:
        raise InputError(
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
    name: str = "image",
    pixel_size_um: float | None = None,
) -> torch.Tensor:
    """Class probabilities of one raw image: normalise, sliding window, softmax (+ TTA).

    After normalisation the image's intensity statistics are compared with the training
    images' (``ckpt["extras"]["input_statistics"]``,
    :func:`scarce.data.drift.warn_if_unusual`): one logged warning naming ``name`` and the
    statistics far outside the training range.

    A model trained on downscaled images (``data.downscale``, recorded in the checkpoint's
    ``extras["scale"]``) gets the image shrunk the same way (to its pixel size when both
    pixel sizes are known) and its logits are enlarged back (:mod:`scarce.segment.scale`).

    Parameters
    ----------
    model : torch.nn.Module
        In eval mode (e.g. from :func:`scarce.engine.checkpoint.load_model`).
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
    name : str
        What the warning calls the image (e.g. its path).
    pixel_size_um : float, optional
        The image's pixel size, µm (brings it to the model's pixel size).

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
    kwargs = _predict_options(
        ckpt, tile_size=tile_size, overlap=overlap, blend=blend, tta=tta, batch_size=batch_size
    )
    tta = kwargs.pop("tta")
    scale = ckpt["extras"].get("scale") or {}
    factor = relative_factor(scale.get("pixel_size_um"), pixel_size_um, scale.get("downscale", 1))
    x = np.ascontiguousarray(normalize(image, ckpt["extras"]["normalization"]))
    warn_if_unusual(x, ckpt["extras"].get("input_statistics"), name)
    x = downscale_image(x, factor)
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # (C, h, w)
    kwargs.update(device=device, progress=progress)

    def probabilities(t: torch.Tensor, k: int = 0) -> torch.Tensor:  # (C, h, w) -> (K, H, W)
        logits = sliding_window_logits(model, t.contiguous(), **kwargs)
        full = image.shape[1:] if k % 2 == 0 else image.shape[:0:-1]  # turned by k quarters
        return torch.softmax(upsample_logits(logits, full), dim=0)

    if not tta:
        return probabilities(x)
    probs = 0.0
    for k, flip in itertools.product(range(4), (False, True)):
        probs += _undo_dihedral(probabilities(_dihedral(x, k, flip), k), k, flip)
    return probs / 8


def instances_from_prediction(
    probabilities, target: str, *, min_object_size: int = 0, min_object_score: float = 0.0
) -> np.ndarray:
    """Instance labels from class probabilities.

    Parameters
    ----------
    probabilities : ndarray or Tensor, shape (K, H, W), float
        Per-class probabilities (or any scores whose argmax is the class map).
    target : {"semantic", "class", "boundary"}
        How the model's classes were made (the checkpoint's ``TargetSpec.rule``). ``semantic``/``class``:
        instances are the 4-connected components of the foreground (argmax > 0); with more
        than 2 classes all foreground classes count as one foreground (touching objects of
        different classes merge). ``boundary`` (0 background, 1 interior, 2 boundary): seeds
        are the 4-connected components of the interior (argmax == 1), grown by a watershed
        on ``1 - p_interior`` within the foreground (argmax != 0), so boundary pixels go to
        the nearest-in-flooding seed and touching objects stay apart.
    min_object_size : int
        Objects with fewer pixels than this are removed (set to 0), pixels.
    min_object_score : float
        Objects whose score, the mean over their pixels of the foreground probability
        ``1 - p_background``, is below this are removed (0 keeps all; in [0, 1]). The
        per-object confidence cut of detectors (Mask R-CNN's score threshold, StarDist's
        ``prob_thresh``), on the network's own probabilities: faint debris that wins the
        argmax by a small margin goes, confident nuclei stay.

    Returns
    -------
    ndarray, shape (H, W), int32
        0 = background, objects numbered 1..N.

    Raises
    ------
    ValueError
        For a wrong shape, an unknown target, a ``boundary`` target without 3 classes, or
        ``min_object_score`` outside [0, 1].

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
    if not 0.0 <= min_object_score <= 1.0:
        raise ValueError(f"min_object_score must be in [0, 1], got {min_object_score}")
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
    if min_object_size > 0 or min_object_score > 0:
        sizes = np.bincount(labels.ravel())
        drop = sizes < min_object_size
        if min_object_score > 0:
            foreground = np.bincount(labels.ravel(), weights=1.0 - probs[0].ravel())
            drop |= foreground / np.maximum(sizes, 1) < min_object_score
        labels[drop[labels]] = 0
    return relabel_sequential(labels.astype(np.int32))[0]


def instance_options(ckpt: dict) -> dict:
    """``min_object_size`` (pixels) and ``min_object_score`` of a checkpoint's predict config.

    For :func:`instances_from_prediction`; a checkpoint from before a key existed gets the
    :class:`~scarce.config.PredictConfig` default (0.0 for the score: nothing removed).
    """
    return _predict_options(ckpt, min_object_size=None, min_object_score=None)


def _collect_images(images) -> list[Path]:
    """Image files from a folder or a single file (errors before any work)."""
    path = Path(images)
    if path.suffix.lower() == ".zarr":
        raise InputError(f"{path}: Zarr images are predicted block-wise (scaleout.predict_any)")
    if path.is_dir():
        files = list_image_files(path)
        if not files:
            raise MissingInputError(
                f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder"
            )
        return files
    if not path.is_file():
        raise MissingInputError(f"{path}: no such image file or folder")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise InputError(
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
        raise InputError(
            f"{len(problems)} of {len(files)} image(s) cannot be predicted:\n  {shown}{more}"
        )


def _make_out_dir(out_dir) -> Path:
    """Create the output folder (or raise an InputError saying why it cannot be used) and
    remove the temporary files a killed prediction left in it (logged)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as exc:
        raise InputError(
            f"cannot create output folder {out} ({exc}); choose another --out"
        ) from exc
    if not os.access(out, os.W_OK):
        raise InputError(f"output folder {out} is not writable; choose another --out")
    atomic.sweep_stale(out)
    return out


def pixel_size_of(ckpt: dict, given: float | None = None) -> float | None:
    """Micrometres per pixel for outputs: ``given``, else the training data's (dataset.yaml)."""
    return given or (ckpt["extras"].get("dataset") or {}).get("pixel_size_um")


def _write_outputs(stem: Path, probs, fmt, probabilities, instances, ckpt, px) -> dict:
    """Write the class map (and probabilities, instances) of ``probs`` ``(K, H, W)``."""
    row = {"probabilities": None, "instances": None}
    classes = probs.argmax(0).numpy()
    row["class_map"] = str(write_label_image(f"{stem}.{fmt}", classes, pixel_size_um=px))
    if probabilities:
        row["probabilities"] = str(
            write_float_image(f"{stem}_prob.tif", probs.numpy(), pixel_size_um=px)
        )
    if instances:
        rule = target_of(ckpt).rule
        labels = instances_from_prediction(probs, rule, **instance_options(ckpt))
        row["instances"] = str(write_label_image(f"{stem}_instances.tif", labels, pixel_size_um=px))
    return row


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
    pixel_size_um: float | None = None,
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
    pixel_size_um : float, optional
        The images' pixel size, µm: brings them to the model's pixel size (see
        :func:`predict_image`) and is recorded in the TIFF outputs (ImageJ/OME metadata);
        default ``pixel_size_um`` of ``dataset.yaml`` beside them, else the training data's.

    Returns
    -------
    list of dict
        One per image: ``image``, ``class_map``, ``probabilities`` and ``instances`` (paths as
        str, or None), ``shape`` ``(H, W)`` and ``seconds`` (wall time).

    Raises
    ------
    MissingInputError
        If ``images`` does not exist or holds no image.
    InputError
        Before any prediction: a bad ``fmt``, an output folder that cannot be made, or (one
        error listing all) unreadable images, images whose channel count is not the model's,
        or two images with the same stem.
    scarce.engine.checkpoint.CheckpointError
        For a missing or invalid checkpoint.
    scarce.errors.WriteError
        If the disk is full or read-only; every output already written is complete, and the
        one being written keeps its previous version (or none).
    """
    if fmt not in ("tif", "png"):
        raise InputError(f"fmt must be 'tif' or 'png', got {fmt!r}")
    files = _collect_images(images)
    out = _make_out_dir(out_dir)
    model, ckpt = load_model(model_path, resolve_device(device))
    _check_all(files, ckpt)
    meta_file = files[0].parent / "dataset.yaml"
    if pixel_size_um is None and meta_file.is_file():
        pixel_size_um = read_dataset_metadata(meta_file)[0]["pixel_size_um"]
    options = dict(tile_size=tile_size, overlap=overlap, blend=blend, tta=tta)
    options.update(batch_size=batch_size, pixel_size_um=pixel_size_um)
    results = []
    for file in tqdm(files, desc="images", unit="image", disable=None if progress else True):
        start = time.perf_counter()
        image = read_image(file)
        probs = predict_image(model, image, ckpt, progress=progress, name=str(file), **options)
        row = {"image": str(file), "shape": tuple(image.shape[1:])}
        px = pixel_size_of(ckpt, pixel_size_um)
        row |= _write_outputs(out / stem_of(file), probs, fmt, probabilities, instances, ckpt, px)
        row["seconds"] = time.perf_counter() - start
        logger.info("%s: %dx%d in %.2f s", file.name, *row["shape"], row["seconds"])
        results.append(row)
    return results

"""Working scale: downscaling images for training and prediction, and what it costs.

A run may shrink its images by ``data.downscale`` = f (2 = half the pixels per side): the
readers cut patches from downscaled images, the evaluation and :mod:`scarce.segment.predict`
downscale the image, run the network and upsample its logits back to the image's size, so
masks and metrics stay at full resolution. Images are shrunk by area averaging (no aliasing),
masks by nearest neighbour (labels keep their values), logits are enlarged bilinearly.

Whether a factor is safe is a property of the ground truth alone: :func:`scale_table` shrinks
the training masks by f, enlarges them back and measures what survives (the notebook's "how
much can we downscale the image and still get 100 % correct cell segmentations after
upscaling?"). It is a ceiling: no network at that scale can do better.

Pixel sizes (``pixel_size_um`` in ``dataset.yaml``) bring images of different pixel sizes to
one scale: a model trained on pixels of ``p_train`` µm at factor f sees pixels of
``p_train * f`` µm, so an image with pixels of ``p`` µm is shrunk by ``p_train * f / p``
(:func:`relative_factor`).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from scarce.segment.metrics import label_components, match_instances

FACTORS = (1, 2, 3, 4, 6)  # downscale factors of the scale table


def resized_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """``(H, W)`` of an image of ``shape`` shrunk by ``factor``: ``round(n / factor)``, >= 1."""
    return tuple(max(1, int(round(n / factor))) for n in shape)


def downscale_image(image: np.ndarray, factor: float) -> np.ndarray:
    """Shrink ``(C, H, W)`` by ``factor`` with area averaging (enlarge bilinearly if < 1).

    Parameters
    ----------
    image : ndarray, shape (C, H, W), any real dtype
    factor : float
        > 0; 1 returns ``image`` itself.

    Returns
    -------
    ndarray, shape (C, round(H / factor), round(W / factor)), float32
        (``image`` unchanged, in its own dtype, when ``factor == 1``.)
    """
    if factor == 1:
        return image
    h, w = resized_shape(image.shape[1:], factor)
    method = cv2.INTER_AREA if factor > 1 else cv2.INTER_LINEAR
    return np.stack(
        [cv2.resize(np.asarray(c, np.float32), (w, h), interpolation=method) for c in image]
    )


def downscale_labels(mask: np.ndarray, factor: float | None = None, shape=None) -> np.ndarray:
    """Resample a label map by nearest neighbour (pixel centres), keeping its dtype and values.

    Parameters
    ----------
    mask : ndarray, shape (H, W), integer
    factor : float, optional
        Shrink factor; the output is ``resized_shape(mask.shape, factor)``.
    shape : (int, int), optional
        The output ``(h, w)`` instead (e.g. the full size, to enlarge back).

    Returns
    -------
    ndarray, shape (h, w), same dtype as ``mask``
    """
    h, w = shape if shape is not None else resized_shape(mask.shape, factor)
    rows = np.minimum(
        ((np.arange(h) + 0.5) * mask.shape[0] / h).astype(np.int64), mask.shape[0] - 1
    )
    cols = np.minimum(
        ((np.arange(w) + 0.5) * mask.shape[1] / w).astype(np.int64), mask.shape[1] - 1
    )
    return mask[rows[:, None], cols[None, :]]


def upsample_logits(logits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Enlarge ``(K, h, w)`` logits bilinearly (align_corners=False) to ``(K, H, W)``."""
    if tuple(logits.shape[1:]) == tuple(shape):
        return logits
    return F.interpolate(logits[None].float(), size=tuple(shape), mode="bilinear")[0]


def relative_factor(model_pixel_um, image_pixel_um, default: float) -> float:
    """Shrink factor that brings an image to the model's pixel size.

    Parameters
    ----------
    model_pixel_um : float or None
        Pixel size the model was trained at (the training pixels times ``data.downscale``), µm.
    image_pixel_um : float or None
        The image's pixel size, µm.
    default : float
        The run's ``data.downscale``, used when either size is unknown.

    Returns
    -------
    float
        ``model_pixel_um / image_pixel_um``, or ``default``.
    """
    if model_pixel_um and image_pixel_um:
        return float(model_pixel_um) / float(image_pixel_um)
    return float(default)


def object_diameters(mask: np.ndarray, mask_kind: str, ignore_label=None) -> np.ndarray:
    """Equivalent diameters of the objects of one mask, pixels.

    Objects are the instances of an instance mask, or the 4-connected components of each
    foreground class of a class map. The equivalent diameter is ``2 * sqrt(area / pi)``.

    Parameters
    ----------
    mask : ndarray, shape (H, W), integer
    mask_kind : {"class", "instance"}
    ignore_label : int, optional
        Label of unlabelled pixels (not an object).

    Returns
    -------
    ndarray, shape (N,), float64
    """
    mask = np.asarray(mask)
    if ignore_label is not None:
        mask = np.where(mask == ignore_label, 0, mask)
    if mask_kind == "instance":
        areas = np.bincount(mask.ravel().astype(np.int64))[1:]
    else:
        areas = np.concatenate(
            [
                np.bincount(label_components(mask == c).ravel())[1:]
                for c in np.unique(mask)
                if c != 0
            ]
            or [np.zeros(0, np.int64)]
        )
    areas = areas[areas > 0]
    return 2.0 * np.sqrt(areas / np.pi)


def _soft_round_trip(mask: np.ndarray, factor: float, ignore_label=None) -> np.ndarray:
    """Class map after shrinking each class's indicator by area and enlarging bilinearly.

    This is what a perfect network at the smaller scale gives after prediction enlarges its
    probabilities: the argmax of the bilinearly enlarged, area-averaged one-hot maps.
    """
    h, w = mask.shape
    small = resized_shape((h, w), factor)
    classes = [c for c in np.unique(mask) if c != ignore_label]
    stack = []
    for c in classes:
        shrunk = cv2.resize(
            (mask == c).astype(np.float32), small[::-1], interpolation=cv2.INTER_AREA
        )
        stack.append(cv2.resize(shrunk, (w, h), interpolation=cv2.INTER_LINEAR))
    return np.asarray(classes)[np.argmax(np.stack(stack), axis=0)]


def scale_ceiling(masks, mask_kind: str, factor: float, ignore_label=None) -> dict:
    """Best foreground Dice (and object F1 at IoU 0.5) reachable at one downscale factor.

    Parameters
    ----------
    masks : iterable of ndarray, shape (H, W), integer
        Training masks at full resolution.
    mask_kind : {"class", "instance"}
    factor : float
        Downscale factor (1 = no change).
    ignore_label : int, optional
        Skipped by the Dice; background for the objects.

    Returns
    -------
    dict
        ``factor``; ``dice``: pooled Dice of the foreground (all classes > 0 as one, over all
        masks) after the soft round trip (:func:`_soft_round_trip`); for instance masks also
        ``object_f1``: F1 of one-to-one matches at IoU >= 0.5 of the labels shrunk and enlarged
        by nearest neighbour (objects that vanish or merge count as missed).

    References
    ----------
    Schmidt et al. 2018, doi:10.1007/978-3-030-00934-2_30 (object matching at IoU 0.5).
    """
    if factor == 1:  # nothing is lost
        return {
            "factor": factor,
            "dice": 1.0,
            **({"object_f1": 1.0} if mask_kind == "instance" else {}),
        }
    inter = total = 0
    tp = fp = fn = 0
    for mask in masks:
        mask = np.asarray(mask)
        valid = mask != ignore_label if ignore_label is not None else np.ones(mask.shape, bool)
        if mask_kind == "instance":
            truth = (mask > 0) & valid
            soft = _soft_round_trip(truth.astype(np.uint8), factor) > 0
        else:
            truth = (mask > 0) & valid
            soft = (_soft_round_trip(mask, factor, ignore_label) > 0) & valid
        inter += int(np.count_nonzero(truth & soft))
        total += int(np.count_nonzero(truth)) + int(np.count_nonzero(soft & valid))
        if mask_kind == "instance":
            labels = np.where(valid, mask, 0)
            back = downscale_labels(downscale_labels(labels, factor), shape=mask.shape)
            counts = match_instances(labels, back, (0.5,))[0.5]
            tp, fp, fn = tp + counts["tp"], fp + counts["fp"], fn + counts["fn"]
    row = {"factor": factor, "dice": 2 * inter / total if total else 1.0}
    if mask_kind == "instance":
        row["object_f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return row


def scale_table(masks, mask_kind: str, factors=FACTORS, ignore_label=None) -> list[dict]:
    """:func:`scale_ceiling` at every factor (masks read once into memory).

    Returns
    -------
    list of dict
        One row per factor, in the order given.
    """
    masks = [np.asarray(m) for m in masks]
    return [scale_ceiling(masks, mask_kind, f, ignore_label) for f in factors]


def format_scale_table(rows: list[dict], diameters_px=None) -> str:
    """The scale table as text, one line per factor (with the median object size there)."""
    has_f1 = any("object_f1" in r for r in rows)
    head = "downscale | best fg Dice" + (" | best object F1@0.5" if has_f1 else "")
    lines = [head + (" | median object diameter" if diameters_px is not None else "")]
    for r in rows:
        line = f"{r['factor']:>9g} | {r['dice']:.4f}     "
        if has_f1:
            line += f" | {r['object_f1']:.4f}             "
        if diameters_px is not None:
            line += f" | {diameters_px / r['factor']:.1f} px"
        lines.append(line)
    return "\n".join(lines)

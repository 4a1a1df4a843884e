"""Training targets and per-pixel weights from masks.

Masks become class maps ``(H, W)`` by a configured rule (:func:`derive_target`): class masks
train as they are; instance masks (0 = background, 1..n = objects) become ``semantic``
(background / foreground) or ``boundary`` targets (background / interior / boundary, so
that touching nuclei can be split after prediction). :func:`border_weight_map` gives the
U-Net paper's per-pixel weights, which raise the loss in narrow gaps between objects;
:func:`num_target_classes` tells the model how many classes the chosen rule yields. The
losses that consume these targets live in :mod:`scarce.segment.losses`.

References
----------
.. [1] O. Ronneberger et al., "U-Net", MICCAI 2015. doi:10.1007/978-3-319-24574-4_28
.. [2] J. C. Caicedo et al., "Evaluation of Deep Learning Strategies for Nucleus
   Segmentation in Fluorescence Images", Cytometry A 2019. doi:10.1002/cyto.a.23863
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from scipy import ndimage
from skimage.measure import label as label_components

from scarce.config import CHOICES
from scarce.errors import InputError

__all__ = [
    "MASK_KINDS",
    "RULES",
    "TARGETS",
    "TargetSpec",
    "border_weight_map",
    "derive_target",
    "instances_to_target",
    "num_target_classes",
    "resolve_target",
]

MASK_KINDS = ("class", "instance")
TARGETS = CHOICES["data.target"]
RULES = ("semantic", "boundary")


def _label_image(labels: np.ndarray, what: str) -> np.ndarray:
    """Check that ``labels`` is a 2-D array of non-negative integers; return it as an array."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{what} must be 2-D (H, W); got shape {labels.shape}")
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} must hold integers; got dtype {labels.dtype}")
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
        raise ValueError(f"{what} must be non-negative; found {labels.min()}")
    return labels


def instances_to_target(labels: np.ndarray, rule: str, boundary_width: int = 2) -> np.ndarray:
    """Class map from an instance label image.

    Parameters
    ----------
    labels : ndarray, shape (H, W), integer
        Instance ids; 0 = background.
    rule : {"semantic", "boundary"}
        ``semantic``: 0 background, 1 foreground. ``boundary``: 0 background, 1 interior,
        2 boundary, where the boundary is every object pixel within ``boundary_width``
        pixels (chessboard distance) of a pixel with a different label, background or
        another object. Two touching objects therefore get ``2 * boundary_width`` boundary
        pixels between them. The patch edge is not a boundary (the image is extended by
        its nearest pixel).
    boundary_width : int, default 2
        Boundary thickness, pixels (>= 1).

    Returns
    -------
    ndarray, shape (H, W), uint8
        The class map.

    Raises
    ------
    ValueError
        If ``labels`` is not a 2-D non-negative integer array, ``rule`` is unknown or
        ``boundary_width`` is not a positive integer.

    References
    ----------
    .. [1] J. C. Caicedo et al., "Evaluation of Deep Learning Strategies for Nucleus
       Segmentation in Fluorescence Images", Cytometry A 2019. doi:10.1002/cyto.a.23863
    """
    if rule not in RULES:
        raise ValueError(f"rule = {rule!r} is not one of {list(RULES)}")
    if not isinstance(boundary_width, int | np.integer) or not 1 <= boundary_width < 2**16:
        raise ValueError(
            f"boundary_width must be a positive integer (pixels), got {boundary_width!r}"
        )
    labels = _label_image(labels, "instance labels")
    foreground = labels > 0
    target = foreground.astype(np.uint8)
    if rule == "boundary":
        size = 2 * int(boundary_width) + 1
        high = ndimage.maximum_filter(labels, size=size, mode="nearest")
        low = ndimage.minimum_filter(labels, size=size, mode="nearest")
        target[foreground & ((high != labels) | (low != labels))] = 2
    return target


def border_weight_map(
    labels: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: Sequence[float] | np.ndarray | None = None,
    *,
    classes: np.ndarray | None = None,
) -> np.ndarray:
    """The U-Net paper's weight map (its equation 2) for an instance label image.

    ``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 sigma**2))``, d1 and d2 being the
    Euclidean distances, pixels, from background pixel x to the nearest and second-nearest
    object (the term is 0 on objects): narrow gaps between objects cost more. Distances
    to an object (OpenCV's exact Euclidean distance transform) are computed in its
    bounding box enlarged by ``ceil(4 sigma)`` pixels; leaving farther objects out
    changes a weight by at most ``w0 * exp(-8)``.

    Parameters
    ----------
    labels : ndarray, shape (H, W), integer
        Instance ids; 0 = background.
    w0 : float, default 10.0
        Peak border weight (the paper's value).
    sigma : float, default 5.0
        Width of the border term, pixels (the paper uses "approximately 5 pixels").
    class_weights : sequence of float, shape (K,), optional
        ``w_c``: weight of each class, indexed by ``classes``; default 1 everywhere.
    classes : ndarray, shape (H, W), integer, optional
        Class map that indexes ``class_weights``; default ``labels > 0``. Pass the
        boundary target (:func:`instances_to_target`) with three class weights.

    Returns
    -------
    ndarray, shape (H, W), float32
        Per-pixel weights (>= 0).

    Raises
    ------
    ValueError
        If ``labels`` is not a 2-D non-negative integer array, ``w0 < 0``, ``sigma <= 0``,
        or ``classes`` has another shape or ids outside ``class_weights``.

    References
    ----------
    .. [1] O. Ronneberger, P. Fischer, T. Brox, "U-Net", MICCAI 2015, equation 2.
       doi:10.1007/978-3-319-24574-4_28
    """
    labels = _label_image(labels, "instance labels")
    if not (w0 >= 0 and sigma > 0):
        raise ValueError(f"need w0 >= 0 and sigma > 0 (pixels); got w0={w0}, sigma={sigma}")
    weights = _class_weight_map(labels, class_weights, classes)
    margin = math.ceil(4 * sigma)
    d1 = np.full(labels.shape, np.inf, dtype=np.float32)
    d2 = np.full(labels.shape, np.inf, dtype=np.float32)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        box = tuple(
            slice(max(s.start - margin, 0), min(s.stop + margin, n))
            for s, n in zip(box, labels.shape)
        )
        outside = (labels[box] != index).astype(np.uint8)
        dist = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)  # exact EDT
        near, second = d1[box], d2[box]
        d2[box] = np.minimum(second, np.maximum(near, dist))
        d1[box] = np.minimum(near, dist)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
    return (weights + np.where(labels == 0, border, 0.0)).astype(np.float32)


def _class_weight_map(labels: np.ndarray, class_weights, classes) -> np.ndarray:
    """``w_c(x)``: ``class_weights[classes[x]]`` (classes default ``labels > 0``), or ones."""
    if class_weights is None:
        return np.ones(labels.shape, dtype=np.float32)
    table = np.asarray(class_weights, dtype=np.float32).ravel()
    if classes is None:
        classes = (labels > 0).astype(np.intp)
    classes = _label_image(classes, "classes")
    if classes.shape != labels.shape:
        raise ValueError(f"classes must have the labels' shape {labels.shape}; got {classes.shape}")
    if classes.size and classes.max() >= table.size:
        raise ValueError(
            f"classes holds id {classes.max()} but class_weights has only "
            f"{table.size} entries; give one weight per class"
        )
    return table[classes]


def derive_target(
    mask: np.ndarray,
    mask_kind: str,
    target: str,
    boundary_width: int = 2,
    *,
    ignore_label: int | None = None,
) -> np.ndarray:
    """Class map to train on, from a mask as stored in the database (readers call it per patch).

    ============  ==========================  ===========================================
    target        class mask                  instance mask
    ============  ==========================  ===========================================
    ``auto``      as is                       ``semantic``
    ``class``     as is                       ``semantic`` (an instance mask has one
                                              foreground class; ids are not classes)
    ``semantic``  0 background, 1 any class   0 background, 1 any object
    ``boundary``  connected regions of equal  0 background, 1 interior, 2 boundary
                  value become objects, then  (:func:`instances_to_target`)
                  as for instance masks
    ============  ==========================  ===========================================

    Parameters
    ----------
    mask : ndarray, shape (H, W), integer
        Class ids or instance ids; 0 = background.
    mask_kind : {"class", "instance"}
        From the database metadata.
    target : {"auto", "class", "semantic", "boundary"}
        The configured rule (``data.target``).
    boundary_width : int, default 2
        Boundary thickness for ``boundary``, pixels.
    ignore_label : int, optional
        Mask value of unlabelled pixels: background while the target is derived (objects
        next to them get a boundary there), this value again in the result.

    Returns
    -------
    ndarray, shape (H, W)
        The mask itself (not a copy) for a class mask with ``auto``/``class``; otherwise a
        new uint8 array (a wider unsigned type if ``ignore_label`` > 255).

    Raises
    ------
    ValueError
        On an unknown ``mask_kind`` or ``target``, a negative ``ignore_label``, or a mask
        that is not a 2-D non-negative integer array.
    """
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask_kind = {mask_kind!r} is not one of {list(MASK_KINDS)}")
    if target not in TARGETS:
        raise ValueError(f"target = {target!r} is not one of {list(TARGETS)}")
    if ignore_label is not None and ignore_label < 0:
        raise ValueError(f"ignore_label must be a non-negative mask value, got {ignore_label}")
    mask = _label_image(mask, "mask")
    if mask_kind == "class" and target in ("auto", "class"):
        return mask
    ignored = None if ignore_label is None else mask == ignore_label
    work = mask if ignored is None else np.where(ignored, 0, mask)
    rule = "boundary" if target == "boundary" else "semantic"
    if rule == "boundary" and mask_kind == "class":
        work = label_components(work, background=0, connectivity=2)
    out = instances_to_target(work, rule, boundary_width)
    if ignored is not None:
        out = out.astype(np.promote_types(np.uint8, np.min_scalar_type(ignore_label)))
        out[ignored] = ignore_label
    return out


def num_target_classes(metadata: Mapping, target: str, *, ignore_label: int | None = None) -> int:
    """Number of classes K the model must output, from a database metadata record.

    Class masks with ``auto``/``class``: ``max(class_ids) + 1`` without the ignore label,
    and at least 2 (a model needs a background and a foreground logit); ``semantic``: 2;
    ``boundary``: 3. Instance masks with ``auto``/``class`` train ``semantic`` targets: 2.

    Parameters
    ----------
    metadata : mapping
        The record ``scarce ingest`` writes; needs ``"mask_kind"`` and, for class masks
        with ``auto``/``class``, ``"class_ids"``.
    target : {"auto", "class", "semantic", "boundary"}
        The configured rule.
    ignore_label : int, optional
        Mask value of unlabelled pixels, not counted as a class.

    Returns
    -------
    int
        K >= 2.

    Raises
    ------
    ValueError
        On a missing key, an unknown ``mask_kind`` or ``target``, or no class id left.
    """
    if target not in TARGETS:
        raise InputError(f"target = {target!r} is not one of {list(TARGETS)}")
    kind = metadata.get("mask_kind")
    if kind not in MASK_KINDS:
        raise InputError(
            f"metadata mask_kind = {kind!r} is not one of {list(MASK_KINDS)}; "
            "is this a Scarce database metadata record?"
        )
    if target in ("semantic", "boundary") or kind == "instance":
        return 3 if target == "boundary" else 2
    if "class_ids" not in metadata:
        raise InputError("metadata has no 'class_ids'; re-ingest the data with scarce ingest")
    ids = [int(c) for c in metadata["class_ids"] if c != ignore_label]
    if not ids:
        raise InputError(
            f"metadata class_ids {metadata['class_ids']} hold no class besides "
            f"the ignore label {ignore_label}"
        )
    return max(max(ids) + 1, 2)


@dataclass(frozen=True)
class TargetSpec:
    """The training target, resolved once from a database and the config, used everywhere.

    Readers derive class maps with it, evaluation during training builds its test targets with
    it, the checkpoint stores it (``extras["target"]``), and prediction and export read it back,
    so the ignore label and the rule cannot disagree between them.

    Attributes
    ----------
    mask_kind : {"class", "instance"}
        Kind of the database's masks.
    rule : {"class", "semantic", "boundary"}
        How masks become class maps (``auto`` resolved: instance masks train ``semantic``,
        class masks ``class``); see :func:`derive_target`.
    boundary_width : int
        Boundary thickness for ``boundary``, pixels.
    ignore_label : int or None
        Mask value of unlabelled pixels, kept in the class maps and skipped by losses and
        metrics (``data.ignore_label``, else the database's ``ignore_label`` from
        ``dataset.yaml``).
    num_classes : int
        Classes K the model outputs (>= 2).
    class_names : tuple of str
        One name per class, K of them.
    """

    mask_kind: str
    rule: str
    boundary_width: int
    ignore_label: int | None
    num_classes: int
    class_names: tuple[str, ...]

    def derive(self, mask: np.ndarray) -> np.ndarray:
        """Class map ``(H, W)`` of a stored mask ``(H, W)`` (see :func:`derive_target`)."""
        return derive_target(
            mask,
            self.mask_kind,
            self.rule,
            self.boundary_width,
            ignore_label=self.ignore_label,
        )

    def to_dict(self) -> dict:
        """Plain values for checkpoints and export metadata."""
        return {**asdict(self), "class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, data: Mapping) -> TargetSpec:
        """The inverse of :meth:`to_dict`."""
        return cls(**{**data, "class_names": tuple(data["class_names"])})


def resolve_target(
    metadata: Mapping,
    target: str = "auto",
    *,
    boundary_width: int = 2,
    ignore_label: int | None = None,
) -> TargetSpec:
    """Resolve the configured target against a database's metadata record.

    Parameters
    ----------
    metadata : mapping
        The record ``scarce ingest`` writes (``mask_kind``, ``class_ids``, ``class_names``,
        ``ignore_label``).
    target : {"auto", "class", "semantic", "boundary"}
        ``data.target``.
    boundary_width : int
        ``data.boundary_width``, pixels.
    ignore_label : int, optional
        ``data.ignore_label``; ``None`` takes the database's (``dataset.yaml``), if any.

    Returns
    -------
    TargetSpec

    Raises
    ------
    ValueError
        As :func:`num_target_classes`.
    """
    kind = metadata.get("mask_kind")
    if ignore_label is None:
        ignore_label = metadata.get("ignore_label")
    k = num_target_classes(metadata, target, ignore_label=ignore_label)
    if target == "boundary":
        rule, names = "boundary", ("background", "interior", "boundary")
    elif target == "semantic" or kind == "instance":
        rule, names = "semantic", ("background", "foreground")
    else:
        stored = metadata.get("class_names")
        rule = "class"
        names = (
            tuple(stored) if stored and len(stored) == k else tuple(f"class{c}" for c in range(k))
        )
    return TargetSpec(kind, rule, int(boundary_width), ignore_label, k, names)

"""Training targets from masks, class and border weights, and segmentation losses.

Masks become class maps ``(H, W)`` by a configured rule (:func:`derive_target`): class masks
train as they are; instance masks (0 = background, 1..n = objects) become ``semantic``
(background / foreground) or ``boundary`` targets (background / interior / boundary, so
that touching nuclei can be split after prediction). The losses take logits
``(N, K, H, W)`` and class maps ``(N, H, W)`` and skip an optional ignore label.

References
----------
.. [1] O. Ronneberger et al., "U-Net", MICCAI 2015. doi:10.1007/978-3-319-24574-4_28
.. [2] F. Isensee et al., "nnU-Net", Nature Methods 2021. doi:10.1038/s41592-020-01008-z
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.measure import label as label_components
from torch import nn

MASK_KINDS = ("class", "instance")
TARGETS = ("auto", "class", "semantic", "boundary")
RULES = ("semantic", "boundary")
LOSSES = ("ce", "dice", "dice_ce")


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
        raise ValueError(f"boundary_width must be a positive integer (pixels), got "
                         f"{boundary_width!r}")
    labels = _label_image(labels, "instance labels")
    foreground = labels > 0
    target = foreground.astype(np.uint8)
    if rule == "boundary":
        size = 2 * int(boundary_width) + 1
        high = ndimage.maximum_filter(labels, size=size, mode="nearest")
        low = ndimage.minimum_filter(labels, size=size, mode="nearest")
        target[foreground & ((high != labels) | (low != labels))] = 2
    return target


def border_weight_map(labels: np.ndarray, w0: float = 10.0, sigma: float = 5.0,
                      class_weights: Sequence[float] | np.ndarray | None = None, *,
                      classes: np.ndarray | None = None) -> np.ndarray:
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
        box = tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n))
                    for s, n in zip(box, labels.shape))
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
        raise ValueError(f"classes must have the labels' shape {labels.shape}; "
                         f"got {classes.shape}")
    if classes.size and classes.max() >= table.size:
        raise ValueError(f"classes holds id {classes.max()} but class_weights has only "
                         f"{table.size} entries; give one weight per class")
    return table[classes]


def class_weights_from_counts(pixel_counts: Mapping | Sequence[int] | np.ndarray,
                              num_classes: int) -> np.ndarray:
    """Inverse-frequency class weights whose pixel-weighted mean is 1.

    ``w_k = total / (P * n_k)`` for the P classes with ``n_k > 0`` pixels, where total is
    their pixel sum; so ``sum_k n_k w_k / total = 1`` and a loss keeps its scale. Classes
    with no pixels get weight 0 (never inf): they cannot occur in the targets they were
    counted on. For a ``boundary`` target, count the derived target pixels, not the
    metadata's instance-mask counts (those have no boundary class).

    Parameters
    ----------
    pixel_counts : mapping or sequence of int
        Pixels per class: ``{"0": n0, "1": n1, ...}`` (keys str or int, as in the metadata
        record's ``class_pixel_counts``) or a sequence indexed by class. Ids >= K (e.g. an
        ignore label of 255) are left out.
    num_classes : int
        K.

    Returns
    -------
    ndarray, shape (K,), float32
        Finite, non-negative weights.

    Raises
    ------
    ValueError
        If a key is not an integer, a count or id is negative, ``num_classes < 1``, or no
        class in ``0 .. K-1`` has any pixel.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    items = pixel_counts.items() if isinstance(pixel_counts, Mapping) else enumerate(pixel_counts)
    counts = np.zeros(num_classes, dtype=np.float64)
    for key, count in items:
        if not str(key).isdigit():
            raise ValueError(f"pixel_counts key {key!r} is not a non-negative integer class id")
        class_id = int(key)
        if count < 0:
            raise ValueError(f"pixel_counts must be non-negative; got {key!r}: {count!r}")
        if class_id < num_classes:
            counts[class_id] += count
    present = counts > 0
    if not present.any():
        raise ValueError(f"no pixels in classes 0..{num_classes - 1}; counts: {pixel_counts}")
    total = counts[present].sum()
    weights = np.zeros(num_classes, dtype=np.float64)
    weights[present] = total / (present.sum() * counts[present])
    return weights.astype(np.float32)


class SegmentationLoss(nn.Module):
    """Cross-entropy, soft Dice, or their sum, on logits, skipping an ignore label.

    Parameters
    ----------
    name : {"ce", "dice", "dice_ce"}, default "dice_ce"
        ``ce``: ``sum_x c[t(x)] w(x) CE(x) / #valid``, with class weights c (default 1),
        the per-pixel ``weight`` w (default 1) and the mean over non-ignored pixels. The
        divisor is the pixel count, not torch's sum of weights, so border weights raise
        the loss where they are large, as in the U-Net paper's energy.
        ``dice``: ``1 - mean_k Dice_k`` with ``Dice_k = (2 sum p_k g_k + s) /
        (sum p_k + sum g_k + s)``, summed over the whole batch (N, H, W) per class
        ("batch Dice"), softmax probabilities p, one-hot targets g, s = 1e-5; class and
        pixel weights do not apply. ``dice_ce``: the sum, each with weight 1 (nnU-Net).
    num_classes : int, default 2
        K (>= 2).
    class_weights : Tensor, shape (K,), optional
        Cross-entropy class weights (e.g. from :func:`class_weights_from_counts`).
    ignore_label : int, optional
        Target value whose pixels count in neither term; may be >= K (e.g. 255).
    dice_include_background : bool, default False
        Average Dice over all classes, or over classes 1..K-1 (nnU-Net's default; on
        nist_rpe the two did not differ beyond seed noise).
    smooth : float, default 1e-5
        s in the Dice ratio; keeps it defined for a class absent from batch and prediction.

    Notes
    -----
    The loss is computed in float32 with autocast switched off, so it is the same under
    bf16/fp16 autocast. ``forward`` checks that target ids are in ``0..K-1`` (or the ignore
    label); on a GPU this costs one synchronisation per call.

    References
    ----------
    .. [1] F. Isensee et al., "nnU-Net", Nature Methods 2021. doi:10.1038/s41592-020-01008-z
    .. [2] F. Milletari, N. Navab, S.-A. Ahmadi, "V-Net", 3DV 2016. doi:10.1109/3DV.2016.79
    """

    def __init__(self, name: str = "dice_ce", num_classes: int = 2, *,
                 class_weights: torch.Tensor | None = None, ignore_label: int | None = None,
                 dice_include_background: bool = False, smooth: float = 1e-5):
        super().__init__()
        if name not in LOSSES:
            raise ValueError(f"loss name {name!r} is not one of {list(LOSSES)}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
            if class_weights.numel() != num_classes or not torch.isfinite(class_weights).all():
                raise ValueError(f"class_weights must be {num_classes} finite values; got "
                                 f"{class_weights.tolist()}")
        self.name, self.num_classes, self.ignore_label = name, num_classes, ignore_label
        self.dice_include_background, self.smooth = dice_include_background, smooth
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar float32 loss for logits ``(N, K, H, W)``, target ``(N, H, W)`` int64
        and an optional per-pixel ``weight`` ``(N, H, W)`` float32 (cross-entropy only).

        Raises
        ------
        ValueError
            On mismatched shapes, a non-integer target, or target ids outside ``0..K-1``
            that are not the ignore label.
        """
        self._check(logits, target, weight)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()  # (N, K, H, W)
            valid = None if self.ignore_label is None else target != self.ignore_label
            target = target.long() if valid is None else target.long().masked_fill(~valid, 0)
            if bool(((target < 0) | (target >= self.num_classes)).any()):
                raise ValueError(f"target holds class ids outside 0..{self.num_classes - 1} "
                                 f"(min {int(target.min())}, max {int(target.max())}); check "
                                 f"num_classes and ignore_label={self.ignore_label}")
            loss = logits.new_zeros(())
            if self.name in ("ce", "dice_ce"):
                loss = loss + self._cross_entropy(logits, target, valid, weight)
            if self.name in ("dice", "dice_ce"):
                loss = loss + self._dice(logits, target, valid)
        return loss

    def _check(self, logits, target, weight) -> None:
        k = self.num_classes
        if logits.ndim != 4 or logits.shape[1] != k:
            raise ValueError(f"logits must be (N, {k}, H, W); got {tuple(logits.shape)}")
        expected = (logits.shape[0], *logits.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(f"target must be (N, H, W) = {expected}; got {tuple(target.shape)}")
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f"target must hold integer class ids; got dtype {target.dtype}")
        if weight is not None and tuple(weight.shape) != expected:
            raise ValueError(f"weight must be (N, H, W) = {expected}; got {tuple(weight.shape)}")

    def _cross_entropy(self, logits, target, valid, weight) -> torch.Tensor:
        ce = F.cross_entropy(logits, target, weight=self.class_weights, reduction="none")
        if weight is not None:
            ce = ce * weight.float()  # (N, H, W)
        if valid is None:
            return ce.mean()
        return (ce * valid).sum() / valid.sum().clamp_min(1)

    def _dice(self, logits, target, valid) -> torch.Tensor:
        probs = torch.softmax(logits, dim=1)  # (N, K, H, W)
        onehot = torch.zeros_like(probs).scatter_(1, target.unsqueeze(1), 1.0)  # (N, K, H, W)
        if valid is not None:
            keep = valid.unsqueeze(1).to(probs.dtype)  # (N, 1, H, W)
            probs, onehot = probs * keep, onehot * keep
        overlap = (probs * onehot).sum(dim=(0, 2, 3))  # (K,)
        total = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))  # (K,)
        dice = (2.0 * overlap + self.smooth) / (total + self.smooth)  # (K,)
        if not self.dice_include_background:
            dice = dice[1:]
        return 1.0 - dice.mean()


def derive_target(mask: np.ndarray, mask_kind: str, target: str, boundary_width: int = 2, *,
                  ignore_label: int | None = None) -> np.ndarray:
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
        raise ValueError(f"target = {target!r} is not one of {list(TARGETS)}")
    kind = metadata.get("mask_kind")
    if kind not in MASK_KINDS:
        raise ValueError(f"metadata mask_kind = {kind!r} is not one of {list(MASK_KINDS)}; "
                         "is this a Scarce database metadata record?")
    if target in ("semantic", "boundary") or kind == "instance":
        return 3 if target == "boundary" else 2
    if "class_ids" not in metadata:
        raise ValueError("metadata has no 'class_ids'; re-ingest the data with scarce ingest")
    ids = [int(c) for c in metadata["class_ids"] if c != ignore_label]
    if not ids:
        raise ValueError(f"metadata class_ids {metadata['class_ids']} hold no class besides "
                         f"the ignore label {ignore_label}")
    return max(max(ids) + 1, 2)

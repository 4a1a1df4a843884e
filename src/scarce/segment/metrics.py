"""Pixel metrics (confusion matrix, IoU, Dice), object matching and metrics, Rand error.

Label arrays are ``(H, W)`` (any shape works where the two arrays agree) non-negative integers,
0 = background. Undefined values (0/0) are ``None``, never NaN, so results are plain JSON.
:mod:`scarce.segment.evaluate` applies these functions to many images and to folders.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import skimage.measure
import skimage.metrics
import torch
from scipy.optimize import linear_sum_assignment

DEFAULT_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50, 0.55 .. 0.95


def _ratio(num, den, zero=None) -> float | None:
    """``num / den`` as a float, or ``zero`` when ``den`` is 0."""
    return float(num / den) if den else zero


def _mean(values) -> float | None:
    """Mean as a float, or None for no values."""
    return float(np.mean(values)) if len(values) else None


def _flat_labels(x, what: str):
    """Flatten labels to int64 (numpy or torch); reject float/complex dtypes."""
    if torch.is_tensor(x):
        if x.is_floating_point() or x.is_complex():
            raise TypeError(f"{what} must hold integer labels, got a {x.dtype} tensor")
        return x.reshape(-1).long()
    a = np.asarray(x)
    if a.dtype.kind not in "biu":
        raise TypeError(f"{what} must hold integer labels, got dtype {a.dtype}; round/cast first")
    return a.reshape(-1).astype(np.int64)


def confusion_matrix(truth, pred, num_classes: int, ignore_label: int | None = None) -> np.ndarray:
    """Count pixels per (true class, predicted class) pair.

    Parameters
    ----------
    truth, pred : ndarray or torch.Tensor, shape (H, W) (any shape, the same for both)
        Integer class maps. Tensors stay on their device (``torch.bincount``); a numpy array
        paired with a tensor is moved to the tensor's device.
    num_classes : int
        K, the number of classes (labels ``0..K-1``).
    ignore_label : int, optional
        Pixels whose truth has this value are skipped (it may be >= K, e.g. 255).

    Returns
    -------
    ndarray, shape (K, K), int64
        Rows are true classes, columns predicted classes.

    Raises
    ------
    ValueError
        Shapes differ, ``num_classes`` < 1, or a label (other than ignored truth) is outside
        ``0..K-1``.
    TypeError
        Float or complex labels.
    """
    k = int(num_classes)
    if k < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    shapes = tuple(np.shape(truth)), tuple(np.shape(pred))
    if shapes[0] != shapes[1]:
        raise ValueError(f"truth shape {shapes[0]} != pred shape {shapes[1]}")
    t, p = _flat_labels(truth, "truth"), _flat_labels(pred, "pred")
    if torch.is_tensor(t) != torch.is_tensor(p):
        device = t.device if torch.is_tensor(t) else p.device
        t, p = torch.as_tensor(t, device=device), torch.as_tensor(p, device=device)
    if ignore_label is not None:
        keep = t != ignore_label
        t, p = t[keep], p[keep]
    for what, v in (("truth", t), ("pred", p)):
        if len(v) and (int(v.min()) < 0 or int(v.max()) >= k):
            raise ValueError(
                f"{what} labels must lie in 0..{k - 1} for num_classes={k}, got values "
                f"{int(v.min())}..{int(v.max())}; pass the model's class count as num_classes"
                + (" or set ignore_label for unlabelled pixels" if what == "truth" else "")
            )
    if torch.is_tensor(t):
        counts = torch.bincount(t * k + p, minlength=k * k).cpu().numpy()
    else:
        counts = np.bincount(t * k + p, minlength=k * k)
    return counts.astype(np.int64).reshape(k, k)


def pixel_metrics(confusion) -> dict:
    """Accuracy, per-class IoU and Dice, and their means from a confusion matrix.

    Parameters
    ----------
    confusion : array-like, shape (K, K), integer
        Pixel counts, rows = truth, columns = prediction (see :func:`confusion_matrix`).

    Returns
    -------
    dict
        ``pixel_accuracy`` and ``pixel_error`` (1 - accuracy; both None without pixels);
        ``per_class``: list of ``{"class", "iou", "dice", "truth_pixels", "pred_pixels"}``,
        IoU = TP / (TP + FP + FN) and Dice = 2 TP / (2 TP + FP + FN), None when the class
        is absent from truth and prediction (0.0 when only predicted or only true);
        ``mean_iou`` and ``mean_dice``: means of the defined values of the foreground classes
        1..K-1, None when there is none (always for K == 1).

    Raises
    ------
    ValueError
        If ``confusion`` is not square or has negative counts.

    References
    ----------
    Everingham et al., "The Pascal Visual Object Classes (VOC) Challenge", IJCV 88 (2010),
    doi:10.1007/s11263-009-0275-4 (IoU from a summed confusion matrix).
    """
    c = np.asarray(confusion, dtype=np.int64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or (c < 0).any():
        raise ValueError(f"confusion must be a square (K, K) count matrix, got shape {c.shape}")
    tp, rows, cols = np.diag(c), c.sum(axis=1), c.sum(axis=0)
    accuracy = _ratio(tp.sum(), c.sum())
    per_class = [
        {
            "class": k,
            "iou": _ratio(tp[k], rows[k] + cols[k] - tp[k]),
            "dice": _ratio(2 * tp[k], rows[k] + cols[k]),
            "truth_pixels": int(rows[k]),
            "pred_pixels": int(cols[k]),
        }
        for k in range(len(c))
    ]
    foreground = {
        key: [e[key] for e in per_class[1:] if e[key] is not None] for key in ("iou", "dice")
    }
    return {
        "pixel_accuracy": accuracy,
        "pixel_error": None if accuracy is None else 1.0 - accuracy,
        "per_class": per_class,
        "mean_iou": _mean(foreground["iou"]),
        "mean_dice": _mean(foreground["dice"]),
    }


def label_components(class_map, connectivity: int = 1) -> np.ndarray:
    """Number the connected components of the foreground (``class_map > 0``).

    All foreground classes count as one: touching pixels of classes 1 and 2 join one object.

    Parameters
    ----------
    class_map : ndarray, shape (H, W), integer or bool
    connectivity : int
        1 = 4-neighbourhood, 2 = 8-neighbourhood (in 2D), as in ``skimage.measure.label``.

    Returns
    -------
    ndarray, shape (H, W), int32
        0 = background, objects 1..N in raster order of their first pixel.

    Raises
    ------
    ValueError
        If ``connectivity`` is not in ``1..ndim``.

    References
    ----------
    Fiorio and Gustedt, "Two linear time Union-Find strategies for image processing", Theor.
    Comput. Sci. 154 (1996), the algorithm of ``skimage.measure.label``.
    """
    a = np.asarray(class_map)
    if not 1 <= connectivity <= a.ndim:
        raise ValueError(f"connectivity must be in 1..{a.ndim}, got {connectivity}")
    return skimage.measure.label(a > 0, connectivity=connectivity).astype(np.int32)


def rand_error(truth_labels, pred_labels) -> float:
    """Adapted Rand error (1 - Rand F-score) of two instance segmentations.

    Truth pixels labelled 0 are not scored (``skimage.metrics.adapted_rand_error``). For class
    maps, pass the connected components of the foreground (:func:`label_components`): that is
    how the ISBI 2012 challenge scored cell interiors (white = cells, black = membrane).
    Predicted background inside true objects counts as one more predicted segment, so a
    prediction whose objects are thinner than the truth's is scored as merging them.

    Parameters
    ----------
    truth_labels, pred_labels : ndarray, shape (H, W), non-negative integers

    Returns
    -------
    float
        In [0, 1], 0 = identical. Cases the formula leaves as 0/0: an empty truth gives 0.0
        if the prediction is empty too and 1.0 otherwise; no two scored pixels sharing a label
        in truth nor in prediction (only single-pixel segments) gives 0.0.

    Raises
    ------
    ValueError
        If the shapes differ.

    References
    ----------
    Arganda-Carreras et al., "Crowdsourcing the creation of image segmentation algorithms for
    connectomics", Front. Neuroanat. 9:142 (2015), doi:10.3389/fnana.2015.00142.
    """
    t, p = np.asarray(truth_labels), np.asarray(pred_labels)
    if t.shape != p.shape:
        raise ValueError(f"truth shape {t.shape} != pred shape {p.shape}")
    if not t.any():
        return 0.0 if not p.any() else 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        error = skimage.metrics.adapted_rand_error(t, p)[0]
    return 0.0 if not np.isfinite(error) else float(error)


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel to 0..N (0 kept for background) -> (flat int64 ids, N)."""
    flat = labels.ravel().astype(np.int64, copy=False)
    if int(flat.max(initial=0)) <= 4 * flat.size:  # lookup table, no sort
        present = np.bincount(flat, minlength=1) > 0
        present[0] = True
        lut = np.cumsum(present) - 1
        return lut[flat], int(lut[-1])
    values, inverse = np.unique(flat, return_inverse=True)
    if values.size and values[0] == 0:
        return inverse.astype(np.int64), values.size - 1
    return inverse.astype(np.int64) + 1, values.size


def _overlaps(truth: np.ndarray, pred: np.ndarray):
    """Overlapping (truth, pred) object pairs and their IoU, without per-object loops."""
    (t, n_true), (p, n_pred) = _compact(truth), _compact(pred)
    code = t * (n_pred + 1) + p
    bins = (n_true + 1) * (n_pred + 1)
    if bins <= max(4 * code.size, 1 << 22):  # dense count is cheap
        counts = np.bincount(code, minlength=bins)
        codes = np.flatnonzero(counts)
        counts = counts[codes]
    else:  # many objects: count only the pairs that occur
        codes, counts = np.unique(code, return_counts=True)
    ti, pi = np.divmod(codes, n_pred + 1)
    area_t, area_p = np.bincount(t, minlength=n_true + 1), np.bincount(p, minlength=n_pred + 1)
    keep = (ti > 0) & (pi > 0)
    ti, pi, inter = ti[keep], pi[keep], counts[keep]
    iou = inter / (area_t[ti] + area_p[pi] - inter)
    return ti - 1, pi - 1, iou, n_true, n_pred


def _assign(ti, pi, iou, threshold: float) -> np.ndarray:
    """IoUs of a one-to-one matching with the most pairs with IoU >= threshold (max IoU sum)."""
    ok = iou >= threshold
    ti, pi, iou = ti[ok], pi[ok], iou[ok]
    alone = (np.bincount(ti)[ti] == 1) & (np.bincount(pi)[pi] == 1)  # no competing pair
    if alone.all():  # always so above 0.5
        return iou
    rows, r = np.unique(ti[~alone], return_inverse=True)
    cols, c = np.unique(pi[~alone], return_inverse=True)
    scores = np.zeros((rows.size, cols.size))
    scores[r, c] = iou[~alone]
    n = min(rows.size, cols.size)
    # StarDist's cost: a match is worth 1, ties broken by IoU (sum of IoU/(2n) stays < 1).
    r_ind, c_ind = linear_sum_assignment(-(scores > 0).astype(float) - scores / (2 * n))
    matched = scores[r_ind, c_ind]
    return np.concatenate([iou[alone], matched[matched > 0]])


def check_thresholds(thresholds) -> tuple[float, ...]:
    """IoU thresholds as a tuple of floats.

    Raises
    ------
    ValueError
        If there is none or one is outside (0, 1].
    """
    values = tuple(float(t) for t in np.atleast_1d(np.asarray(thresholds, dtype=float)))
    if not values or any(not 0.0 < t <= 1.0 for t in values):
        raise ValueError(f"IoU thresholds must be in (0, 1], got {thresholds!r}")
    return values


def check_labels(a: np.ndarray, what: str) -> np.ndarray:
    """Return ``a`` if it holds non-negative integer labels (any shape).

    Raises
    ------
    TypeError
        If ``a`` is not of an integer or bool dtype.
    ValueError
        If ``a`` has a negative label; ``what`` names the array in the message.
    """
    if a.dtype.kind not in "biu":
        raise TypeError(f"{what} must hold integer labels, got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError(f"{what} has negative labels (min {a.min()}); labels must be >= 0")
    return a


def match_instances(truth_labels, pred_labels, thresholds=DEFAULT_THRESHOLDS) -> dict:
    """Match predicted to true objects one-to-one and count TP, FP and FN per IoU threshold.

    For each threshold, ``scipy.optimize.linear_sum_assignment`` picks the matching with the
    most pairs whose IoU >= threshold (ties: the highest IoU sum), as StarDist does. With
    ``>=`` an object split into equal halves has one half matched at 0.5; the DSB2018 scorer
    used ``>``. Above 0.5 the matching is unique (IoU > 0.5 with at most one other object).

    Parameters
    ----------
    truth_labels, pred_labels : ndarray, shape (H, W), non-negative integers
        Instance labels, 0 = background. Ids need not be contiguous.
    thresholds : sequence of float
        IoU thresholds in (0, 1].

    Returns
    -------
    dict
        ``{threshold: {"tp", "fp", "fn", "matched_ious"}}``; FP = predicted objects left
        unmatched, FN = true objects left unmatched, ``matched_ious`` the IoU of each match.

    Raises
    ------
    ValueError
        Shapes differ, negative labels, thresholds outside (0, 1].
    TypeError
        Float labels.

    References
    ----------
    Schmidt et al., "Cell Detection with Star-Convex Polygons", MICCAI 2018,
    doi:10.1007/978-3-030-00934-2_30 (``stardist.matching``).
    Caicedo et al., "Nucleus segmentation across imaging experiments: the 2018 Data Science
    Bowl", Nat. Methods 16 (2019), doi:10.1038/s41592-019-0612-7.
    """
    t = check_labels(np.asarray(truth_labels), "truth_labels")
    p = check_labels(np.asarray(pred_labels), "pred_labels")
    if t.shape != p.shape:
        raise ValueError(f"truth_labels shape {t.shape} != pred_labels shape {p.shape}")
    ti, pi, iou, n_true, n_pred = _overlaps(t, p)
    result = {}
    for thr in check_thresholds(thresholds):
        ious = _assign(ti, pi, iou, thr)
        tp = int(ious.size)
        result[thr] = {
            "tp": tp,
            "fp": n_pred - tp,
            "fn": n_true - tp,
            "matched_ious": [float(v) for v in ious],
        }
    return result


def sum_counts(per_image: Iterable[Mapping]) -> dict:
    """Add per-image :func:`match_instances` results: TP, FP, FN summed, IoU lists joined.

    Parameters
    ----------
    per_image : iterable of dict
        ``{threshold: {"tp", "fp", "fn", "matched_ious"}}``, one per image.

    Returns
    -------
    dict
        The same layout with counts over all images (empty for no images).

    Raises
    ------
    ValueError
        If the images were matched at different thresholds.
    """
    total: dict = {}
    for counts in per_image:
        if total and set(counts) != set(total):
            raise ValueError(
                f"thresholds differ between images: {sorted(total)} vs "
                f"{sorted(counts)}; match all images at the same thresholds"
            )
        for thr, c in counts.items():
            acc = total.setdefault(thr, {"tp": 0, "fp": 0, "fn": 0, "matched_ious": []})
            for key in ("tp", "fp", "fn"):
                acc[key] += int(c[key])
            acc["matched_ious"].extend(c.get("matched_ious", []))
    return total


def object_metrics(counts) -> dict:
    """Precision, recall, F1 and DSB2018/StarDist AP from counts summed over images.

    Ratios of summed counts (an image with many objects weighs more than one with few):
    precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2TP/(2TP+FP+FN), AP = TP/(TP+FP+FN).
    Without any object (TP = FP = FN = 0) all are 1.0; otherwise 0/0 is 0.0, as in StarDist.

    Parameters
    ----------
    counts : dict or iterable of dict
        ``{threshold: {"tp", "fp", "fn", "matched_ious"}}`` from :func:`match_instances`,
        already summed over images, or a list of per-image counts (summed by :func:`sum_counts`).

    Returns
    -------
    dict
        ``{threshold: {"tp", "fp", "fn", "precision", "recall", "f1", "ap",
        "mean_matched_iou"}}``; ``mean_matched_iou`` is None without matches.

    References
    ----------
    Caicedo et al. 2019, doi:10.1038/s41592-019-0612-7 (AP as TP/(TP+FP+FN));
    Schmidt et al. 2018, doi:10.1007/978-3-030-00934-2_30.
    """
    if not isinstance(counts, Mapping):
        counts = sum_counts(counts)
    out = {}
    for thr, c in counts.items():
        tp, fp, fn = int(c["tp"]), int(c["fp"]), int(c["fn"])
        zero = 1.0 if tp + fp + fn == 0 else 0.0  # value of 0/0: nothing to find and none found
        out[thr] = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": _ratio(tp, tp + fp, zero),
            "recall": _ratio(tp, tp + fn, zero),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn, zero),
            "ap": _ratio(tp, tp + fp + fn, zero),
            "mean_matched_iou": _mean(c.get("matched_ious", [])),
        }
    return out

"""Pixel and object metrics of segmentation results; evaluation of a folder of predictions.

Pixel metrics come from one confusion matrix summed over all images (a large image weighs more
than a small one; nothing is averaged per image). Object metrics match predicted to true
objects one-to-one and sum TP/FP/FN over images before computing ratios. The Rand error is
the exception: it is computed per image and averaged, as in the ISBI 2012 challenge.

Label arrays are ``(H, W)`` (any shape works where the two arrays agree) non-negative integers,
0 = background. Undefined values (0/0) are ``None``, never NaN, so metrics.json is plain JSON.
"""

from __future__ import annotations

import csv
import io as _io
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import skimage.measure
import skimage.metrics
import torch
from scipy.optimize import linear_sum_assignment

from scarce.io import MASK_EXTENSIONS, ImageFileError, list_image_files, read_mask, stem_of

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50, 0.55 .. 0.95
LABEL_KINDS = ("auto", "instances", "classes")
COMPANION_SUFFIXES = ("_instances", "_prob")  # extra outputs of `scarce predict`


class EvaluationError(ValueError):
    """Prediction and truth folders do not fit together; ``problems`` lists one line per file."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) with the evaluation files:\n{lines}")


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
    if tuple(np.shape(truth)) != tuple(np.shape(pred)):
        raise ValueError(f"truth shape {tuple(np.shape(truth))} != pred shape "
                         f"{tuple(np.shape(pred))}")
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
        ``mean_iou`` and ``mean_dice``: means over the foreground classes 1..K-1 whose values
        are defined, None when there is none (always for K == 1: background alone has no
        foreground to score).

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
    total, diag = int(c.sum()), np.diag(c)
    rows, cols = c.sum(axis=1), c.sum(axis=0)
    accuracy = float(diag.sum() / total) if total else None
    per_class = []
    for k in range(c.shape[0]):
        denom = int(rows[k] + cols[k])
        iou = float(diag[k] / (denom - diag[k])) if denom else None
        dice = float(2 * diag[k] / denom) if denom else None
        per_class.append({"class": k, "iou": iou, "dice": dice,
                          "truth_pixels": int(rows[k]), "pred_pixels": int(cols[k])})
    ious = [e["iou"] for e in per_class[1:] if e["iou"] is not None]
    dices = [e["dice"] for e in per_class[1:] if e["dice"] is not None]
    return {
        "pixel_accuracy": accuracy,
        "pixel_error": None if accuracy is None else 1.0 - accuracy,
        "per_class": per_class,
        "mean_iou": float(np.mean(ious)) if ious else None,
        "mean_dice": float(np.mean(dices)) if dices else None,
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


def to_instances(labels, kind: str = "auto") -> np.ndarray:
    """Instance labels from either instance labels or a class map.

    Parameters
    ----------
    labels : ndarray, shape (H, W), non-negative integers
    kind : {"auto", "instances", "classes"}
        ``"instances"`` keeps the labels; ``"classes"`` numbers the 4-connected components of
        the foreground (:func:`label_components`). ``"auto"`` reads the array as a class map
        when at least half of its nonzero values are split into several 8-connected pieces
        (a class map of many nuclei has one value in many pieces; instance labels have one
        piece per value, with rare exceptions that this rule tolerates). Pass the
        kind explicitly when you know it.

    Returns
    -------
    ndarray, shape (H, W), int64 (instances) or int32 (components)

    Raises
    ------
    ValueError
        For an unknown ``kind``.
    """
    if kind not in LABEL_KINDS:
        raise ValueError(f"kind must be one of {LABEL_KINDS}, got {kind!r}")
    a = np.asarray(labels)
    if kind == "auto":
        regions = skimage.measure.label(a, background=0, connectivity=a.ndim)
        value_of = np.zeros(int(regions.max()) + 1, dtype=np.int64)
        value_of[regions.ravel()] = a.ravel()
        _, pieces = np.unique(value_of[1:], return_counts=True)
        kind = "classes" if 2 * np.count_nonzero(pieces > 1) >= len(pieces) else "instances"
    return label_components(a) if kind == "classes" else a.astype(np.int64)


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
    t, n_true = _compact(truth)
    p, n_pred = _compact(pred)
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
    rows, r, r_count = np.unique(ti, return_inverse=True, return_counts=True)
    cols, c, c_count = np.unique(pi, return_inverse=True, return_counts=True)
    alone = (r_count[r] == 1) & (c_count[c] == 1)  # pairs that compete with no other pair
    if alone.all():  # always so above 0.5
        return iou
    rows, r = np.unique(r[~alone], return_inverse=True)
    cols, c = np.unique(c[~alone], return_inverse=True)
    scores = np.zeros((rows.size, cols.size))
    scores[r, c] = iou[~alone]
    n = min(rows.size, cols.size)
    # StarDist's cost: a match is worth 1, ties broken by IoU (sum of IoU/(2n) stays < 1).
    r_ind, c_ind = linear_sum_assignment(-(scores > 0).astype(float) - scores / (2 * n))
    matched = scores[r_ind, c_ind]
    return np.concatenate([iou[alone], matched[matched > 0]])


def _check_thresholds(thresholds) -> tuple[float, ...]:
    values = tuple(float(t) for t in np.atleast_1d(np.asarray(thresholds, dtype=float)))
    if not values or any(not 0.0 < t <= 1.0 for t in values):
        raise ValueError(f"IoU thresholds must be in (0, 1], got {thresholds!r}")
    return values


def _check_labels(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype.kind not in "biu":
        raise TypeError(f"{what} must hold integer labels, got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError(f"{what} has negative labels (min {a.min()}); labels must be >= 0")
    return a


def match_instances(truth_labels, pred_labels, thresholds=DEFAULT_THRESHOLDS) -> dict:
    """Match predicted to true objects one-to-one and count TP, FP and FN per IoU threshold.

    Overlaps of all object pairs come from one ``np.bincount`` over ``truth * (N_pred + 1) +
    pred`` (labels relabelled to 0..N first), never from per-object loops. For each threshold,
    ``scipy.optimize.linear_sum_assignment`` picks the one-to-one matching with the most pairs
    whose IoU >= threshold (ties: the highest IoU sum), as StarDist does. The rule is ``>=``:
    an object split into two equal halves has one half matched at 0.5 (IoU exactly 0.5). The
    DSB2018 Kaggle scorer used ``>``; it differs only for IoU exactly on a threshold. Above
    0.5 the matching is unique (one object can have IoU > 0.5 with at most one other).

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
    t = _check_labels(np.asarray(truth_labels), "truth_labels")
    p = _check_labels(np.asarray(pred_labels), "pred_labels")
    if t.shape != p.shape:
        raise ValueError(f"truth_labels shape {t.shape} != pred_labels shape {p.shape}")
    ti, pi, iou, n_true, n_pred = _overlaps(t, p)
    result = {}
    for thr in _check_thresholds(thresholds):
        ious = _assign(ti, pi, iou, thr)
        tp = int(ious.size)
        result[thr] = {"tp": tp, "fp": n_pred - tp, "fn": n_true - tp,
                       "matched_ious": [float(v) for v in ious]}
    return result


def sum_counts(per_image: Iterable[Mapping]) -> dict:
    """Add per-image :func:`match_instances` results: TP, FP, FN summed, IoU lists joined.

    Raises
    ------
    ValueError
        If the images were matched at different thresholds.
    """
    total: dict = {}
    for counts in per_image:
        if total and set(counts) != set(total):
            raise ValueError(f"thresholds differ between images: {sorted(total)} vs {sorted(counts)}")
        for thr, c in counts.items():
            acc = total.setdefault(thr, {"tp": 0, "fp": 0, "fn": 0, "matched_ious": []})
            for key in ("tp", "fp", "fn"):
                acc[key] += int(c[key])
            acc["matched_ious"].extend(c.get("matched_ious", []))
    return total


def object_metrics(counts) -> dict:
    """Precision, recall, F1 and DSB2018/StarDist AP from counts summed over images.

    TP, FP and FN are summed over all images first (:func:`sum_counts`; a list of per-image
    counts is summed here), then the ratios are taken once, so an image with many objects
    weighs more than one with few: precision = TP/(TP+FP), recall = TP/(TP+FN),
    F1 = 2TP/(2TP+FP+FN), AP = TP/(TP+FP+FN). With no objects at all (TP = FP = FN = 0)
    every ratio is 1.0 (nothing to find, nothing found); otherwise a 0/0 ratio (precision
    without predictions, recall without true objects) is 0.0, as in StarDist.

    Parameters
    ----------
    counts : dict or iterable of dict
        ``{threshold: {"tp", "fp", "fn", "matched_ious"}}`` from :func:`match_instances`.

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
        empty = tp + fp + fn == 0
        ious = c.get("matched_ious", [])
        out[thr] = {
            "tp": tp, "fp": fp, "fn": fn,
            "precision": 1.0 if empty else (tp / (tp + fp) if tp + fp else 0.0),
            "recall": 1.0 if empty else (tp / (tp + fn) if tp + fn else 0.0),
            "f1": 1.0 if empty else 2 * tp / (2 * tp + fp + fn),
            "ap": 1.0 if empty else tp / (tp + fp + fn),
            "mean_matched_iou": float(np.mean(ious)) if len(ious) else None,
        }
    return out


def _evaluate_one(name, truth, pred, num_classes, instances, thresholds, ignore_label, kinds):
    """Confusion matrix, object counts and the per-image row of one (truth, pred) pair."""
    try:
        t = _check_labels(np.asarray(truth), "truth")
        p = _check_labels(np.asarray(pred), "pred")
        if t.shape != p.shape:
            raise ValueError(f"truth shape {t.shape} != pred shape {p.shape}")
        valid = np.ones(t.shape, bool) if ignore_label is None else t != ignore_label
        t0, p0 = np.where(valid, t, 0), np.where(valid, p, 0)
        if instances:
            conf = confusion_matrix((t0 > 0)[valid], (p0 > 0)[valid], 2)
            t_obj, p_obj = to_instances(t0, kinds[0]), to_instances(p0, kinds[1])
        else:
            k = num_classes or max(int(t0.max(initial=0)), int(p0.max(initial=0)), 1) + 1
            conf = confusion_matrix(t, p, k, ignore_label)
            t_obj, p_obj = label_components(t0), label_components(p0)
        counts = match_instances(t_obj, p_obj, thresholds) if instances else None
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{name}: {exc}") from exc
    pm = pixel_metrics(conf)
    row = {"image": name, "pixel_accuracy": pm["pixel_accuracy"], "mean_iou": pm["mean_iou"],
           "mean_dice": pm["mean_dice"], "rand_error": rand_error(t_obj, p_obj)}
    if instances:
        first = counts[thresholds[0]]
        row.update(matched=first["tp"], truth_objects=first["tp"] + first["fn"],
                   predicted_objects=first["tp"] + first["fp"])
        row[f"f1_{thresholds[0]:.2f}"] = object_metrics({thresholds[0]: first})[thresholds[0]]["f1"]
    return row, conf, counts


def evaluate_arrays(pairs, num_classes=None, instances=False, iou_thresholds=DEFAULT_THRESHOLDS,
                    ignore_label=None, *, pred_kind="auto", truth_kind="auto"):
    """Pixel metrics, Rand error and (optionally) object metrics of many images.

    Parameters
    ----------
    pairs : iterable of (str, ndarray (H, W), ndarray (H, W))
        ``(name, truth, pred)`` with non-negative integer labels; read once, in order.
    num_classes : int, optional
        K for class maps. None infers it as the largest label + 1 over all truth (ignored
        pixels excluded) and predictions, at least 2 (background and one class).
    instances : bool
        Object evaluation. Pixel metrics are then foreground/background (``> 0``, K = 2;
        ``num_classes`` is ignored) and objects are matched per image (:func:`match_instances`).
    iou_thresholds : sequence of float
        Matching thresholds; the first one gives the per-image ``matched`` and F1 columns.
    ignore_label : int, optional
        Truth value of unlabelled pixels: skipped by the pixel metrics and set to background in
        truth and prediction before objects and Rand error are computed.
    pred_kind, truth_kind : {"auto", "instances", "classes"}
        How labels become objects when ``instances`` (see :func:`to_instances`): a keyword
        rather than a boolean, because "auto" recognises both a binary/semantic class map
        (objects = its connected components) and instance labels (kept as given).

    Returns
    -------
    metrics : dict
        ``num_images``, ``num_classes``, the keys of :func:`pixel_metrics` from the confusion
        matrix summed over all images, ``rand_error`` (per-image :func:`rand_error` on
        instances, or on foreground components of class maps, averaged over images), and with
        ``instances`` ``objects`` (``{"0.50": object_metrics}``, counts summed over images)
        and ``mean_ap`` (AP averaged over the thresholds).
    rows : list of dict
        One per image: ``image, pixel_accuracy, mean_iou, mean_dice, rand_error`` and with
        ``instances`` ``matched, truth_objects, predicted_objects, f1_<first threshold>``.

    Raises
    ------
    ValueError
        No pairs, bad arguments, or an image with wrong labels or shapes (named).

    References
    ----------
    Caicedo et al. 2019, doi:10.1038/s41592-019-0612-7 (object metrics of DSB2018);
    Arganda-Carreras et al. 2015, doi:10.3389/fnana.2015.00142 (ISBI 2012 pixel/Rand error).
    """
    thresholds = _check_thresholds(iou_thresholds)
    for kind in (pred_kind, truth_kind):
        if kind not in LABEL_KINDS:
            raise ValueError(f"pred_kind/truth_kind must be one of {LABEL_KINDS}, got {kind!r}")
    if num_classes is not None and int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
    if instances and num_classes not in (None, 2):
        log.warning("num_classes=%s ignored: instance pixel metrics are foreground/background",
                    num_classes)
    k_fixed = None if instances else num_classes
    rows, confusions, counts = [], [], []
    for name, truth, pred in pairs:
        row, conf, cnt = _evaluate_one(name, truth, pred, k_fixed, instances, thresholds,
                                       ignore_label, (truth_kind, pred_kind))
        rows.append(row)
        confusions.append(conf)
        counts.append(cnt)
    if not rows:
        raise ValueError("no (name, truth, pred) pairs to evaluate")
    k = max(c.shape[0] for c in confusions)
    total = np.zeros((k, k), dtype=np.int64)
    for c in confusions:
        total[: c.shape[0], : c.shape[1]] += c
    metrics = {"num_images": len(rows), "num_classes": k, **pixel_metrics(total),
               "rand_error": float(np.mean([r["rand_error"] for r in rows]))}
    if instances:
        objects = object_metrics(sum_counts(counts))
        metrics["objects"] = {f"{thr:.2f}": v for thr, v in objects.items()}
        metrics["mean_ap"] = float(np.mean([v["ap"] for v in objects.values()]))
    return metrics, rows


def _index_folder(folder, what: str, problems: list[str]) -> dict[str, Path]:
    """Mask files of ``folder`` by stem; a missing folder or a repeated stem is a problem."""
    try:
        files = list_image_files(folder, MASK_EXTENSIONS)
    except FileNotFoundError:
        problems.append(f"{folder}: the {what} folder does not exist")
        return {}
    if not files:
        problems.append(f"{folder}: no {what} masks ({', '.join(MASK_EXTENSIONS)})")
    by_stem: dict[str, Path] = {}
    for f in files:
        if stem_of(f) in by_stem:
            problems.append(f"{f}: {what} file with the same stem as {by_stem[stem_of(f)].name}; "
                            "keep one of them")
        else:
            by_stem[stem_of(f)] = f
    return by_stem


def _pick_predictions(preds: dict, truths: dict, instances: bool) -> dict[str, Path]:
    """Drop ``scarce predict`` companions (``<stem>_prob``, ``<stem>_instances``) of a truth
    stem; with ``instances``, ``<stem>_instances`` replaces the class map ``<stem>``."""
    picked = {}
    for stem, path in preds.items():
        base = next((stem[: -len(s)] for s in COMPANION_SUFFIXES if stem.endswith(s)), None)
        if base not in truths:
            picked.setdefault(stem, path)
        elif instances and stem == f"{base}_instances":
            picked[base] = path
    return picked


def _load_pairs(pred_dir, truth_dir, num_classes, ignore_label, instances) -> list:
    """Read all pairs, collecting every problem; raise one EvaluationError listing them."""
    problems: list[str] = []
    truths = _index_folder(truth_dir, "truth", problems)
    preds = _pick_predictions(_index_folder(pred_dir, "prediction", problems), truths, instances)
    for stem in sorted(truths.keys() - preds.keys()):
        problems.append(f"{truths[stem]}: no prediction with this stem in {pred_dir}")
    for stem in sorted(preds.keys() - truths.keys()):
        problems.append(f"{preds[stem]}: no truth mask with this stem in {truth_dir}")
    pairs = []
    for stem in sorted(preds.keys() & truths.keys()):
        arrays = []
        for path in (truths[stem], preds[stem]):
            try:
                arrays.append(read_mask(path))
            except ImageFileError as exc:
                problems.append(str(exc))
        if len(arrays) < 2:
            continue
        t, p = arrays
        if t.shape != p.shape:
            problems.append(f"{preds[stem]}: size {p.shape} (H, W) differs from the truth "
                            f"{truths[stem].name} {t.shape}; predict at the truth's size")
            continue
        if num_classes is not None:
            scored = t if ignore_label is None else np.where(t == ignore_label, 0, t)
            for path, a in ((truths[stem], scored), (preds[stem], p)):
                top = int(a.max(initial=0))
                if top >= num_classes:
                    problems.append(f"{path}: label {top} >= num_classes={num_classes}")
        pairs.append((stem, t, p))
    if problems:
        raise EvaluationError(problems)
    return pairs


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_outputs(out_dir, metrics: dict, rows: list[dict]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else round(v, 6) if isinstance(v, float) else v
                         for k, v in row.items()})
    _write_atomic(out / "per_image.csv", buf.getvalue())


def evaluate_folders(pred_dir, truth_dir, out_dir=None, *, num_classes=None, instances=False,
                     iou_thresholds=DEFAULT_THRESHOLDS, ignore_label=None, pred_kind="auto",
                     truth_kind="auto") -> dict:
    """Evaluate a folder of predicted masks against a folder of true masks.

    Files pair by stem (``img_01.tif`` with ``img_01.png``); both folders are read with
    :func:`scarce.io.read_mask` and held in memory (fine for the small sets Scarce targets).
    The extra outputs of ``scarce predict`` next to a class map ``<stem>`` are not orphans:
    ``<stem>_prob`` is skipped, and ``<stem>_instances`` is skipped too, except with
    ``instances`` where it is the prediction (post-processed instance labels beat the
    components of the class map). All problems are collected before any metric is computed.
    Other arguments as in :func:`evaluate_arrays`.

    Parameters
    ----------
    pred_dir, truth_dir : path-like
        Folders of label images (``.tif``, ``.tiff``, ``.png``, ``.bmp``), one per image.
    out_dir : path-like, optional
        Receives ``metrics.json`` (the returned dict) and ``per_image.csv`` (one row per image,
        empty cells for undefined values), each written to a temp file and renamed.

    Returns
    -------
    dict
        The metrics of :func:`evaluate_arrays`.

    Raises
    ------
    EvaluationError
        Listing every file with a problem: no partner in the other folder (either way), a size
        mismatch, an unreadable file, two files with one stem, a label >= ``num_classes``.
    ValueError
        Bad arguments (thresholds, kinds, ``num_classes``).
    """
    _check_thresholds(iou_thresholds)
    for kind in (pred_kind, truth_kind):
        if kind not in LABEL_KINDS:
            raise ValueError(f"pred_kind/truth_kind must be one of {LABEL_KINDS}, got {kind!r}")
    pairs = _load_pairs(pred_dir, truth_dir, None if instances else num_classes, ignore_label,
                        instances)
    metrics, rows = evaluate_arrays(pairs, num_classes, instances, iou_thresholds, ignore_label,
                                    pred_kind=pred_kind, truth_kind=truth_kind)
    if out_dir is not None:
        _write_outputs(out_dir, metrics, rows)
    return metrics


def _fmt(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def format_summary(metrics: dict) -> str:
    """A short human-readable multi-line summary of :func:`evaluate_arrays` metrics."""
    lines = [
        f"{metrics.get('num_images', '?')} image(s), {metrics.get('num_classes', '?')} classes",
        f"pixel accuracy {_fmt(metrics['pixel_accuracy'])}  (pixel error "
        f"{_fmt(metrics['pixel_error'])}),  Rand error {_fmt(metrics['rand_error'])}",
        f"mean IoU {_fmt(metrics['mean_iou'])},  mean Dice {_fmt(metrics['mean_dice'])}"
        "  (foreground classes)",
    ]
    lines += [f"  class {e['class']}: IoU {_fmt(e['iou'])}  Dice {_fmt(e['dice'])}"
              for e in metrics["per_class"]]
    if "objects" in metrics:
        lines.append("objects (one-to-one, IoU >= threshold, counts summed over images):")
        lines.append(f"  {'IoU':>4} {'TP':>7} {'FP':>7} {'FN':>7} {'prec':>6} {'recall':>6} "
                     f"{'F1':>6} {'AP':>6}")
        for thr, o in metrics["objects"].items():
            lines.append(f"  {thr:>4} {o['tp']:>7} {o['fp']:>7} {o['fn']:>7} "
                         f"{_fmt(o['precision'], '.3f'):>6} {_fmt(o['recall'], '.3f'):>6} "
                         f"{_fmt(o['f1'], '.3f'):>6} {_fmt(o['ap'], '.3f'):>6}")
        lines.append(f"mean AP over thresholds: {_fmt(metrics.get('mean_ap'))}")
    return "\n".join(lines)

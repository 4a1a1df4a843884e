"""Evaluation of many images or of two folders of label masks: metrics, per-image rows, reports.

Pixel metrics come from one confusion matrix summed over all images (a large image weighs more
than a small one; nothing is averaged per image). Object metrics match predicted to true
objects one-to-one and sum TP/FP/FN over images before computing ratios. The Rand error is
the exception: it is computed per image and averaged, as in the ISBI 2012 challenge. The metric
functions themselves are in :mod:`scarce.segment.metrics`.
"""

from __future__ import annotations

import csv
import io as _io
import json
import logging
from pathlib import Path

import numpy as np
import skimage.measure

from scarce import atomic
from scarce.errors import EvaluationError, InputError
from scarce.io import MASK_EXTENSIONS, ImageFileError, list_image_files, read_mask, stem_of
from scarce.segment.metrics import (
    DEFAULT_THRESHOLDS,
    check_labels,
    check_thresholds,
    confusion_matrix,
    label_components,
    match_instances,
    object_metrics,
    pixel_metrics,
    rand_error,
)

__all__ = [
    "COMPANION_SUFFIXES",
    "LABEL_KINDS",
    "evaluate_arrays",
    "evaluate_folders",
    "format_summary",
    "to_instances",
]

log = logging.getLogger(__name__)

LABEL_KINDS = ("auto", "instances", "classes")
COMPANION_SUFFIXES = ("_instances", "_prob")  # extra outputs of `scarce predict`


def to_instances(labels, kind: str = "auto") -> np.ndarray:
    """Instance labels from either instance labels or a class map.

    Parameters
    ----------
    labels : ndarray, shape (H, W), non-negative integers
    kind : {"auto", "instances", "classes"}
        ``"instances"`` keeps the labels; ``"classes"`` numbers the 4-connected components of
        the foreground (:func:`scarce.segment.metrics.label_components`). ``"auto"`` reads the array
        as a class map when at least half of its nonzero values are split into several
        8-connected pieces (a class map of many nuclei has one value in many pieces; instance
        labels have one piece per value, with rare exceptions). Pass the kind when you know it.

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


def _check_options(iou_thresholds, num_classes, kinds) -> tuple[float, ...]:
    """Check the options shared by evaluate_arrays and evaluate_folders; the thresholds."""
    thresholds = check_thresholds(iou_thresholds)
    for kind in kinds:
        if kind not in LABEL_KINDS:
            raise ValueError(f"pred_kind/truth_kind must be one of {LABEL_KINDS}, got {kind!r}")
    if num_classes is not None and int(num_classes) < 1:
        raise InputError(f"num_classes must be >= 1 or None, got {num_classes}")
    return thresholds


def _evaluate_one(name, truth, pred, num_classes, instances, thresholds, ignore_label, kinds):
    """Confusion matrix, object counts and the per-image row of one (truth, pred) pair."""
    try:
        t = check_labels(np.asarray(truth), "truth")
        p = check_labels(np.asarray(pred), "pred")
        if t.shape != p.shape:
            raise ValueError(f"truth shape {t.shape} != pred shape {p.shape}")
        valid = np.ones(t.shape, bool) if ignore_label is None else t != ignore_label
        t0, p0 = np.where(valid, t, 0), np.where(valid, p, 0)
        counts = None
        if instances:
            conf = confusion_matrix((t0 > 0)[valid], (p0 > 0)[valid], 2)
            t_obj, p_obj = to_instances(t0, kinds[0]), to_instances(p0, kinds[1])
            counts = match_instances(t_obj, p_obj, thresholds)
        else:
            k = num_classes or max(int(t0.max(initial=0)), int(p0.max(initial=0)), 1) + 1
            conf = confusion_matrix(t, p, k, ignore_label)
            t_obj, p_obj = label_components(t0), label_components(p0)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{name}: {exc}") from exc
    pm = pixel_metrics(conf)
    row = {
        "image": name,
        "pixel_accuracy": pm["pixel_accuracy"],
        "mean_iou": pm["mean_iou"],
        "mean_dice": pm["mean_dice"],
        "rand_error": rand_error(t_obj, p_obj),
    }
    if instances:
        first = object_metrics(counts)[thresholds[0]]
        row.update(
            matched=first["tp"],
            truth_objects=first["tp"] + first["fn"],
            predicted_objects=first["tp"] + first["fp"],
        )
        row[f"f1_{thresholds[0]:.2f}"] = first["f1"]
    return row, conf, counts


def evaluate_arrays(
    pairs,
    num_classes=None,
    instances=False,
    iou_thresholds=DEFAULT_THRESHOLDS,
    ignore_label=None,
    *,
    pred_kind="auto",
    truth_kind="auto",
):
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
    thresholds = _check_options(iou_thresholds, num_classes, (pred_kind, truth_kind))
    if instances and num_classes not in (None, 2):
        log.warning(
            "num_classes=%s ignored: instance pixel metrics are foreground/background", num_classes
        )
    k_fixed = None if instances else num_classes
    rows, confusions, counts = [], [], []
    for name, truth, pred in pairs:
        row, conf, cnt = _evaluate_one(
            name, truth, pred, k_fixed, instances, thresholds, ignore_label, (truth_kind, pred_kind)
        )
        rows.append(row)
        confusions.append(conf)
        counts.append(cnt)
    if not rows:
        raise ValueError("no (name, truth, pred) pairs to evaluate")
    k = max(c.shape[0] for c in confusions)
    total = np.zeros((k, k), dtype=np.int64)
    for c in confusions:
        total[: c.shape[0], : c.shape[1]] += c
    metrics = {
        "num_images": len(rows),
        "num_classes": k,
        **pixel_metrics(total),
        "rand_error": float(np.mean([r["rand_error"] for r in rows])),
    }
    if instances:
        objects = object_metrics(counts)  # summed over images first
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
            problems.append(
                f"{f}: {what} file with the same stem as {by_stem[stem_of(f)].name}; "
                "keep one of them"
            )
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
            problems.append(
                f"{preds[stem]}: size {p.shape} (H, W) differs from the truth "
                f"{truths[stem].name} {t.shape}; predict at the truth's size"
            )
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


def _write_outputs(out_dir, metrics: dict, rows: list[dict]) -> None:
    """metrics.json and per_image.csv (6 decimals, empty cells for None) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                k: "" if v is None else round(v, 6) if isinstance(v, float) else v
                for k, v in row.items()
            }
        )
    atomic.write_text(out / "per_image.csv", buf.getvalue())


def evaluate_folders(
    pred_dir,
    truth_dir,
    out_dir=None,
    *,
    num_classes=None,
    instances=False,
    iou_thresholds=DEFAULT_THRESHOLDS,
    ignore_label=None,
    pred_kind="auto",
    truth_kind="auto",
) -> dict:
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
    _check_options(iou_thresholds, num_classes, (pred_kind, truth_kind))
    pairs = _load_pairs(
        pred_dir, truth_dir, None if instances else num_classes, ignore_label, instances
    )
    metrics, rows = evaluate_arrays(
        pairs,
        num_classes,
        instances,
        iou_thresholds,
        ignore_label,
        pred_kind=pred_kind,
        truth_kind=truth_kind,
    )
    if out_dir is not None:
        _write_outputs(out_dir, metrics, rows)
    return metrics


def _fmt(value, spec: str = ".4f") -> str:
    """``value`` formatted with ``spec``, or "n/a" for None."""
    return "n/a" if value is None else format(value, spec)


def format_summary(metrics: dict) -> str:
    """A short human-readable summary of evaluation metrics, as ``scarce evaluate`` prints it.

    Parameters
    ----------
    metrics : dict
        The metrics of :func:`evaluate_arrays` or :func:`evaluate_folders` (or metrics.json).

    Returns
    -------
    str
        Several lines: image and class counts, pixel accuracy/error, Rand error, mean and
        per-class IoU and Dice, and with object metrics a table of TP, FP, FN, precision,
        recall, F1 and AP per IoU threshold; undefined values read "n/a".

    Raises
    ------
    KeyError
        If a pixel metric key of :func:`evaluate_arrays` is missing.
    """
    lines = [
        f"{metrics.get('num_images', '?')} image(s), {metrics.get('num_classes', '?')} classes",
        f"pixel accuracy {_fmt(metrics['pixel_accuracy'])}  (pixel error "
        f"{_fmt(metrics['pixel_error'])}),  Rand error {_fmt(metrics['rand_error'])}",
        f"mean IoU {_fmt(metrics['mean_iou'])},  mean Dice {_fmt(metrics['mean_dice'])}"
        "  (foreground classes)",
    ]
    lines += [
        f"  class {e['class']}: IoU {_fmt(e['iou'])}  Dice {_fmt(e['dice'])}"
        for e in metrics["per_class"]
    ]
    if "objects" in metrics:
        lines.append("objects (one-to-one, IoU >= threshold, counts summed over images):")
        lines.append(
            f"  {'IoU':>4} {'TP':>7} {'FP':>7} {'FN':>7} {'prec':>6} {'recall':>6} "
            f"{'F1':>6} {'AP':>6}"
        )
        for thr, o in metrics["objects"].items():
            lines.append(
                f"  {thr:>4} {o['tp']:>7} {o['fp']:>7} {o['fn']:>7} "
                f"{_fmt(o['precision'], '.3f'):>6} {_fmt(o['recall'], '.3f'):>6} "
                f"{_fmt(o['f1'], '.3f'):>6} {_fmt(o['ap'], '.3f'):>6}"
            )
        lines.append(f"mean AP over thresholds: {_fmt(metrics.get('mean_ap'))}")
    return "\n".join(lines)

"""Checks across the files of a dataset: channel counts, dtypes, class ids, names.

:func:`check_dataset` runs after every pair was read (:mod:`scarce.data.checks`) and returns
the :class:`~scarce.data.records.StoragePlan` all samples are stored with, and the problems
(one line each, naming a file). Nothing here writes or reads files.

Rules where the issue left a choice:

- Channels: a grayscale image among colour images is repeated into their 3 (RGB) or 4 (RGBA)
  channels: the same gray in R, G and B is the same picture (dsb2018 mixes RGB and grayscale).
  Repeating it into 2 or 5 fluorescence channels would invent stains: refused, naming a file of
  each count. Other mixes are refused too.
- Image dtypes: mixed dtypes are promoted losslessly (``numpy.result_type``, e.g. uint8 +
  uint16 -> uint16) when the result is a supported image dtype; otherwise an error.
- Class ids: class masks whose values are exactly 0 and 255 over the whole dataset are
  Fiji/ImageJ binary masks: 255 is stored as 1 (``StoragePlan.label_map``, a warning says so),
  unless ``dataset.yaml`` makes 255 the ignore label. A class id above 255 (usually an instance
  mask, or a wrong file) is refused unless the class count is confirmed (``num_classes``,
  ``--num-classes``); with a confirmed count, ids at or above it are refused.
- Mask dtypes: class masks are stored in the smallest unsigned dtype that holds the largest
  label of the dataset; instance masks keep their dtype (mixed or 64-bit ones: the smallest
  lossless one) and are never relabelled.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from scarce import io
from scarce.data.records import StoragePlan

__all__ = ["FIJI_BINARY", "check_dataset"]

log = logging.getLogger(__name__)

FIJI_BINARY = 255  # foreground value of Fiji/ImageJ binary masks
MAX_CLASS_ID = 255  # larger class ids need a confirmed class count
COLOUR_CHANNELS = (3, 4)  # RGB, RGBA: the channel counts a grayscale image may repeat into


def _minority_problems(sources, attribute: str, what: str, fix: str) -> list[str]:
    """One line per file whose ``attribute`` differs from the most common value."""
    common, count = Counter(getattr(s, attribute) for s in sources).most_common(1)[0]
    return [
        f"{s.image_path}: {what} {getattr(s, attribute)}, but {count} image(s) have {common}; {fix}"
        for s in sources
        if getattr(s, attribute) != common
    ]


def _mask_dtype(sources, mask_kind: str) -> np.dtype:
    """Class masks: smallest unsigned dtype for the largest label. Instance masks: their dtype,
    promoted losslessly when mixed or 64-bit."""
    max_label = max(int(s.labels[-1]) if s.labels.size else 0 for s in sources)
    dtype = np.result_type(*{s.mask_dtype for s in sources})
    if mask_kind == "instance" and dtype.itemsize <= 4:
        return dtype
    return io.smallest_label_dtype(max_label)


def _name_problems(sources, meta: dict, mask_kind: str, channels: int, meta_path) -> list[str]:
    """``class_names``/``channel_names`` of ``dataset.yaml`` against the files."""
    problems = []
    names = meta["class_names"]
    if mask_kind == "class" and names is not None:
        top = max(int(s.labels[s.labels != meta["ignore_label"]].max(initial=0)) for s in sources)
        if top >= len(names):
            worst = next(s for s in sources if top in s.labels)
            problems.append(
                f"{meta_path}: class_names has {len(names)} names but mask "
                f"{worst.mask_path.name} holds label {top}; name every class id "
                "0..max (or set ignore_label)"
            )
    if meta["channel_names"] is not None and len(meta["channel_names"]) != channels:
        problems.append(
            f"{meta_path}: channel_names has {len(meta['channel_names'])} names but "
            f"the images have {channels} channel(s)"
        )
    return problems


def _channel_problems(sources) -> list[str]:
    """Channel counts: one count, or grayscale among RGB(A) (repeated later)."""
    counts = {s.channels for s in sources}
    channels = max(counts)
    if len(counts) == 1:
        return []
    if counts == {1, channels} and channels not in COLOUR_CHANNELS:
        colour = next(s for s in sources if s.channels == channels)
        return [
            f"{s.image_path}: 1 channel, but {colour.image_path} has {channels}; a grayscale "
            "image is repeated only into RGB(A) (3 or 4) channels, not into "
            f"{channels} separate channels; give every image the same channels"
            for s in sources
            if s.channels == 1
        ]
    if counts == {1, channels}:
        return []
    return _minority_problems(
        sources, "channels", "has channel count", "every image needs the same number of channels"
    )


def _class_id_problems(sources, meta: dict, num_classes: int | None) -> tuple[tuple, list[str]]:
    """Fiji 0/255 masks (-> a label map) and class ids above 255 or the confirmed count."""
    ignore = meta["ignore_label"]
    present = set().union(*(s.labels.tolist() for s in sources)) - {ignore}
    if present in ({0, FIJI_BINARY}, {FIJI_BINARY}) and num_classes is None:
        for s in sources:
            s.labels = np.where(s.labels == FIJI_BINARY, 1, s.labels)
        log.warning(
            "every class mask holds only 0 and 255 (a Fiji/ImageJ binary mask): storing 255 as "
            "class 1, so the model has 2 classes; if 255 means 'unlabelled', set "
            "ignore_label: 255 in dataset.yaml"
        )
        return ((FIJI_BINARY, 1),), []
    top = max(present, default=0)
    limit = MAX_CLASS_ID if num_classes is None else num_classes - 1
    if top <= limit:
        return (), []
    worst = next(s for s in sources if top in s.labels)
    fix = (
        f"it is outside --num-classes {num_classes} (ids 0..{num_classes - 1})"
        if num_classes is not None
        else f"class ids above {MAX_CLASS_ID} are usually instance labels (use --mask-kind "
        "instance) or a wrong file; if the dataset really has that many classes, confirm it "
        f"with --num-classes N (N > {top})"
    )
    return (), [f"{worst.mask_path}: class id {top} in a class mask; {fix}"]


def check_dataset(
    sources: list, meta: dict, mask_kind: str, meta_path, num_classes: int | None = None
) -> tuple[StoragePlan, list[str]]:
    """Checks across files; returns the storage plan and problems.

    Parameters
    ----------
    sources : list of scarce.data.checks.Source
        Validated pairs (at least one). Fiji 0/255 masks get their ``labels`` remapped here.
    meta : dict
        From :func:`scarce.data.datasetyaml.read_dataset_metadata`.
    mask_kind : {"class", "instance"}
    meta_path : path-like or None
        Named in problems about ``meta``.
    num_classes : int, optional
        The class count the user confirms (class masks): ids must be below it, and ids above
        255 are then accepted. Also turns off the Fiji 0/255 detection.

    Returns
    -------
    plan : StoragePlan
        Meaningful only when there are no problems.
    problems : list of str
        Channel counts that cannot be reconciled, image dtypes with no lossless common dtype,
        class ids above 255 (or the confirmed count), too few class or channel names.
    """
    problems = _channel_problems(sources)
    channels = max(s.channels for s in sources)
    image_dtypes = {s.image_dtype for s in sources}
    image_dtype = np.result_type(*image_dtypes)
    if image_dtype.name not in io.IMAGE_DTYPES:
        problems += _minority_problems(
            sources, "image_dtype", "has dtype", "convert the images to one dtype"
        )
    elif len(image_dtypes) > 1:
        log.warning(
            "images have dtypes %s; storing all as %s (lossless)",
            sorted(d.name for d in image_dtypes),
            image_dtype,
        )
    label_map = ()
    if mask_kind == "class":
        label_map, found = _class_id_problems(sources, meta, num_classes)
        problems += found
    problems += _name_problems(sources, meta, mask_kind, channels, meta_path)
    mask_dtype = _mask_dtype(sources, mask_kind)
    return StoragePlan(mask_kind, channels, image_dtype, mask_dtype, label_map), problems

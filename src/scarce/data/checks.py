"""Validation step of ingest: pair files, read ``dataset.yaml``, check every pair and the set.

Nothing here writes. Each check adds a line naming the file or folder to a list of problems
rather than stopping at the first; :func:`validate_folders` raises one :class:`IngestError`
listing them all. :func:`scarce.data.ingest.ingest` runs these checks before writing anything.

Rules where the issue left a choice:

- Channels: grayscale images among multi-channel ones (dsb2018 mixes RGB and grayscale) are
  repeated to the common channel count, which is lossless; other mixes are errors.
- Image dtypes: mixed dtypes are promoted losslessly (``numpy.result_type``, e.g. uint8 +
  uint16 -> uint16) when the result is a supported image dtype; otherwise an error.
- Masks: class masks are stored in the smallest unsigned dtype that holds the largest label of
  the dataset; instance masks keep their dtype (mixed or 64-bit ones: the smallest lossless
  one) and are never relabelled.

References
----------
The NIST system Scarce replaces pairs images and masks by file name in ``UNet/build_lmdb.py``
of https://github.com/usnistgov/semantic-segmentation-unet.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from scarce import io
from scarce.data.datasetyaml import read_dataset_metadata
from scarce.data.records import StoragePlan, label_counts
from scarce.data.sources import FileReader, list_inputs
from scarce.errors import IngestError

__all__ = ["IngestError", "Source", "check_dataset", "map_ahead", "pair_files", "validate_folders"]

log = logging.getLogger(__name__)

CACHE_BYTES = 2 << 30  # default: decoded arrays kept between validation and writing, bytes


@dataclass
class Source:
    """One validated image/mask pair (``image``/``mask`` hold the decoded arrays if cached)."""

    stem: str
    image_path: Path
    mask_path: Path
    shape: tuple[int, int]  # (H, W), pixels
    channels: int
    image_dtype: np.dtype
    mask_dtype: np.dtype
    labels: np.ndarray  # (K,) label values present, int64
    counts: np.ndarray  # (K,) pixels per label value, int64
    image: np.ndarray | None = None  # (C, H, W)
    mask: np.ndarray | None = None  # (H, W)


def map_ahead(function, items, workers: int):
    """``map(function, items)`` on ``workers`` threads, in order, at most ``2 * workers`` ahead.

    Decoders, OpenCV and LMDB release the GIL, so threads overlap them; the bound keeps at
    most ``2 * workers + 1`` results in memory. Work not yet started is cancelled when the
    consumer stops early (an exception or Ctrl-C).
    """
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) > 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


# ----------------------------------------------------------------------------- pairing


def _index_folder(folder: Path, role: str, problems: list[str]) -> tuple[dict[str, Path], set]:
    """Map stem -> file for one folder, recording empty folders, duplicates and JPEG masks.

    Returns the index and the stems of refused files (they count as present, not as missing).
    """
    if not folder.is_dir():
        problems.append(f"{folder}: not a folder (expected the folder of {role}s)")
        return {}, set()
    files = list_inputs(folder)
    if not files:
        problems.append(f"{folder}: no {role} files (looked for {', '.join(io.IMAGE_EXTENSIONS)})")
    index: dict[str, Path] = {}
    refused = set()
    for path in files:
        stem = io.stem_of(path)
        if role == "mask" and path.suffix.lower() in (".jpg", ".jpeg"):
            problems.append(
                f"{path}: JPEG masks are refused (lossy compression changes labels); "
                "save masks as PNG or TIFF"
            )
            refused.add(stem)
        elif stem in index:
            problems.append(
                f"{path}: two {role}s share the stem {stem!r} ({index[stem].name}); keep one"
            )
        else:
            index[stem] = path
    return index, refused


def pair_files(images_dir, masks_dir) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """Pair images and masks by file stem.

    Parameters
    ----------
    images_dir, masks_dir : path-like
        Folders (not searched recursively); files with other suffixes are ignored.

    Returns
    -------
    pairs : list of (stem, image_path, mask_path)
        Sorted by stem.
    problems : list of str
        Missing or empty folders, duplicate stems, JPEG masks, images without a mask and masks
        without an image, one line each naming the file.
    """
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    if images_dir.resolve() == masks_dir.resolve():
        return [], [
            f"{images_dir}: images and masks are the same folder; pairing is by "
            "file stem, so put the masks in a folder of their own"
        ]
    problems: list[str] = []
    images, _ = _index_folder(images_dir, "image", problems)
    masks, refused = _index_folder(masks_dir, "mask", problems)
    if images and (masks or refused):
        problems += [
            f"{images[s]}: no mask with stem {s!r} in {masks_dir}"
            for s in sorted(images.keys() - masks.keys() - refused)
        ]
        problems += [
            f"{masks[s]}: no image with stem {s!r} in {images_dir}"
            for s in sorted(masks.keys() - images.keys())
        ]
    pairs = [(s, images[s], masks[s]) for s in sorted(images.keys() & masks.keys())]
    return pairs, problems


# ----------------------------------------------------------------------------- per file


def _check_pair(stem, image_path, mask_path, reader) -> tuple[Source | None, tuple, list]:
    """Read and check one pair; return its Source (no arrays), the arrays and problems."""
    problems, image, mask = [], None, None
    try:
        image = reader.image(image_path)
    except io.ImageFileError as exc:
        problems.append(str(exc))
    try:
        mask = reader.mask(mask_path)
    except io.ImageFileError as exc:
        problems.append(str(exc))
    if image is not None and mask is not None and image.shape[1:] != mask.shape:
        problems.append(
            f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but image "
            f"{image_path.name} is {image.shape[1]}x{image.shape[2]}; a mask must "
            "match its image pixel for pixel"
        )
    if problems:
        return None, (), problems
    source = Source(
        stem,
        image_path,
        mask_path,
        mask.shape,
        image.shape[0],
        image.dtype,
        mask.dtype,
        *label_counts(mask),
    )
    return source, (image, mask), []


def _check_pairs(pairs, reader, progress, workers, cache_bytes):
    """Check all pairs on ``workers`` threads; cache arrays, in stem order, up to the budget."""
    sources, problems, cached = [], [], 0
    results = map_ahead(lambda pair: _check_pair(*pair, reader), pairs, workers)
    for source, arrays, found in tqdm(
        results, total=len(pairs), desc="validate", unit="file", disable=None if progress else True
    ):
        problems += found
        if source is None:
            continue
        nbytes = sum(a.nbytes for a in arrays)
        if cached + nbytes <= cache_bytes:
            source.image, source.mask = arrays
            cached += nbytes
        sources.append(source)
    return sources, problems


# ----------------------------------------------------------------------------- across files


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


def check_dataset(
    sources: list[Source], meta: dict, mask_kind: str, meta_path
) -> tuple[StoragePlan, list[str]]:
    """Checks across files; returns the storage plan and problems.

    Parameters
    ----------
    sources : list of Source
        Validated pairs (at least one).
    meta : dict
        From :func:`read_dataset_metadata`.
    mask_kind : {"class", "instance"}
    meta_path : path-like or None
        Named in problems about ``meta``.

    Returns
    -------
    plan : StoragePlan
        Meaningful only when there are no problems.
    problems : list of str
        Channel counts other than C and 1, image dtypes with no lossless common dtype, too few
        class or channel names.
    """
    problems: list[str] = []
    counts = {s.channels for s in sources}
    channels = max(counts)
    if len(counts) > 1 and counts != {1, channels}:
        problems += _minority_problems(
            sources,
            "channels",
            "has channel count",
            "every image needs the same number of channels",
        )
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
    problems += _name_problems(sources, meta, mask_kind, channels, meta_path)
    plan = StoragePlan(mask_kind, channels, image_dtype, _mask_dtype(sources, mask_kind))
    return plan, problems


def check_folders(
    images_dir, masks_dir, *, mask_kind, metadata, reader, progress, workers, cache_bytes
) -> tuple[list[Source], dict, StoragePlan | None, list]:
    """:func:`validate_folders` without the raise: ``(sources, meta, plan, problems)``.

    ``reader`` is a :class:`scarce.data.sources.FileReader`; ``plan`` is ``None`` when no
    pair could be read.
    """
    pairs, problems = pair_files(images_dir, masks_dir)
    meta, found = read_dataset_metadata(metadata)
    problems += found
    mask_kind = mask_kind or meta["mask_kind"] or "class"
    reader = reader.for_dataset(meta)
    sources, found = _check_pairs(pairs, reader, progress, workers, cache_bytes)
    problems += found
    plan = None
    if sources:
        plan, found = check_dataset(sources, meta, mask_kind, metadata)
        problems += found
    return sources, meta, plan, problems


def validate_folders(
    images_dir,
    masks_dir,
    *,
    mask_kind: str | None = None,
    metadata=None,
    channel_axis: int | None = None,
    progress: bool = False,
    workers: int | None = None,
    cache_bytes: int = CACHE_BYTES,
) -> tuple[list[Source], dict, StoragePlan]:
    """Read every pair once and check everything; raise with all problems, or return the plan.

    Parameters
    ----------
    images_dir, masks_dir : path-like
        Images ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` and masks ``(H, W)``.
    mask_kind : {"class", "instance", None}
        ``None``: ``mask_kind`` of ``dataset.yaml``, else ``"class"``.
    metadata : path-like or None
        ``dataset.yaml``.
    channel_axis : {None, 0, -1}
        See :func:`scarce.io.to_chw`.
    progress : bool
        Show a progress bar (only on a terminal).
    workers : int or None
        Decoder threads; default ``min(8, os.cpu_count())``.
    cache_bytes : int
        Decoded arrays are kept in the sources (stem order) while their total fits, bytes.

    Returns
    -------
    sources : list of Source
        Sorted by stem.
    meta : dict
        The dataset metadata.
    plan : StoragePlan
        See :func:`check_dataset`.

    Raises
    ------
    ValueError
        For a ``mask_kind`` other than ``"class"``, ``"instance"`` or ``None``.
    IngestError
        With every problem found (files, folders, metadata).
    """
    if mask_kind not in (None, "class", "instance"):
        raise ValueError(f"mask_kind must be 'class' or 'instance', got {mask_kind!r}")
    sources, meta, plan, problems = check_folders(
        images_dir,
        masks_dir,
        mask_kind=mask_kind,
        metadata=metadata,
        reader=FileReader(channel_axis),
        progress=progress,
        workers=workers or min(8, os.cpu_count() or 1),
        cache_bytes=cache_bytes,
    )
    if problems:
        raise IngestError(problems)
    return sources, meta, plan

"""Validation step of ingest: pair files, read ``dataset.yaml``, check every pair and the set.

Nothing here writes. Each check adds a line naming the file or folder to a list of problems
rather than stopping at the first; :func:`validate_folders` raises one :class:`IngestError`
listing them all. :func:`scarce.data.ingest.ingest` runs these checks before writing anything.

The checks across files (channels, dtypes, class ids, names) are in
:mod:`scarce.data.consistency`.

References
----------
The NIST system Scarce replaces pairs images and masks by file name in ``UNet/build_lmdb.py``
of https://github.com/usnistgov/semantic-segmentation-unet.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from scarce import io
from scarce.data.consistency import check_dataset
from scarce.data.datasetyaml import read_dataset_metadata
from scarce.data.records import StoragePlan, label_counts
from scarce.data.sources import FileReader, list_inputs
from scarce.errors import IngestError

__all__ = ["IngestError", "Source", "map_ahead", "pair_files", "validate_folders"]

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


def check_folders(
    images_dir,
    masks_dir,
    *,
    mask_kind,
    metadata,
    reader,
    progress,
    workers,
    cache_bytes,
    num_classes=None,
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
        plan, found = check_dataset(sources, meta, mask_kind, metadata, num_classes)
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
    num_classes: int | None = None,
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
    num_classes : int, optional
        Confirmed class count of class masks (see :func:`scarce.data.consistency.check_dataset`).

    Returns
    -------
    sources : list of Source
        Sorted by stem.
    meta : dict
        The dataset metadata.
    plan : StoragePlan
        See :func:`scarce.data.consistency.check_dataset`.

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
        num_classes=num_classes,
    )
    if problems:
        raise IngestError(problems)
    return sources, meta, plan

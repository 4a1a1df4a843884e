"""Folders of images and masks -> ``DB_DIR/train.lmdb``, ``DB_DIR/test.lmdb`` and ``split.json``.

Three steps, in this order:

1. **Validate** every image/mask pair (:func:`validate_folders`): pairing by file stem, the
   file checks of :mod:`scarce.io`, shape agreement, channel counts, dtypes and the optional
   ``dataset.yaml``. All problems are collected; if there is any, :class:`IngestError` lists
   them (one line each, naming the file) and nothing is written.
2. **Split by source image** (:func:`split_stems`) before tiling, so the tiles of one image
   never land in both splits; or take a given split (``split.json`` or a dict).
3. **Write** each split into a temporary directory beside ``DB_DIR``, then rename it into
   place: a crash or Ctrl-C leaves the old database or none, never half of one.

Decoded arrays from step 1 are kept for step 3 while they fit in ``CACHE_BYTES``; files beyond
that are decoded again (measured on dsb2018 in ``benchmarks/results/ingest.md``).

Rules where the issue left a choice:

- Split: stems sorted, shuffled with ``np.random.default_rng(seed)``; the first
  ``round_half_up((1 - train_fraction) * n)`` shuffled stems are test, but at least 1 test and
  1 train image when ``train_fraction < 1`` and ``n >= 2``. A single image always goes to train
  (a warning says there is no test set) and, like ``train_fraction=1``, no ``test.lmdb`` is
  written. A given split must name every stem exactly once and nothing else.
- Channels: grayscale images among multi-channel ones (dsb2018 mixes RGB and grayscale) are
  repeated to the common channel count, which is lossless; other mixes are errors.
- Image dtypes: mixed dtypes are promoted losslessly (``numpy.result_type``, e.g. uint8 +
  uint16 -> uint16) when the result is a supported image dtype; otherwise an error.
- Masks: class masks are stored in the smallest unsigned dtype that holds the largest label of
  the dataset; instance masks keep their dtype (mixed or 64-bit ones: the smallest lossless
  one) and are never relabelled.
- Statistics: pixel counts per class count each source pixel once (tiles may overlap); the
  intensity mean/std are exact over all pixels of the split; the 1st/99th percentiles are
  exact up to ``PERCENTILE_PIXELS`` pixels per split and estimated beyond on a seeded uniform
  subsample of that many pixels.

Metadata record of each database (JSON under ``store.METADATA_KEY``): ``format_version``,
``split``, ``num_samples``, ``channels``, ``image_dtype``, ``mask_dtype``, ``mask_kind``,
``class_ids`` (label values present; ``[0, 1]`` for instance masks), ``class_pixel_counts``
(``str(id) -> pixels``; instance masks ``"0"``/``"1"``), ``num_instances`` (instance masks,
else ``None``), ``intensity`` (``mean``/``std``/``p1``/``p99``, one value per channel),
``source`` (absolute ``images``/``masks`` folders), ``sources`` (stems), ``source_files``
(stem -> ``[image name, mask name]``), ``channel_expanded`` (stems repeated from grayscale),
``tiling`` (``None`` or ``tile_size``/``tile_stride``), ``class_names``, ``channel_names``,
``pixel_size_um``, ``description``, ``ignore_label`` (from ``dataset.yaml``, else ``None``),
``created`` (ISO 8601, UTC), ``scarce_version``, ``raw_bytes`` (image + mask bytes) and
``samples``: one ``{"name", "source", "origin": [y, x], "shape": [H, W], "classes"}`` per
record, in key order.

References
----------
The NIST system Scarce replaces builds LMDB databases from folders in ``UNet/build_lmdb.py``
and ``UNet/build_lmdb_tiling.py`` of https://github.com/usnistgov/semantic-segmentation-unet.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import yaml
from tqdm import tqdm

from scarce import __version__, io, store
from scarce.store import format_inspection, inspect_database

__all__ = ["IngestError", "format_inspection", "ingest", "inspect_database", "split_stems",
           "tile_origins", "validate_folders"]

log = logging.getLogger(__name__)

DATASET_KEYS = ("class_names", "channel_names", "pixel_size_um", "description", "mask_kind",
                "ignore_label")
OUTPUT_NAMES = {"train.lmdb", "test.lmdb", "split.json"}  # what an overwrite may replace
COMMIT_BYTES = 64 << 20  # bytes of records per write transaction
CACHE_BYTES = 2 << 30  # decoded arrays kept between validation and writing, bytes
PERCENTILE_PIXELS = 2_000_000  # pixels per split for the percentile estimate


class IngestError(ValueError):
    """Validation failed; nothing was written.

    Attributes
    ----------
    problems : list of str
        One line per problem, each starting with the file (or folder) it is about.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) found, nothing was written:\n{lines}")


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


# ----------------------------------------------------------------------------- pairing, yaml


def _index_folder(folder: Path, role: str, problems: list[str]) -> tuple[dict[str, Path], set]:
    """Map stem -> file for one folder, recording empty folders, duplicates and JPEG masks.

    Returns the index and the stems of refused files (they count as present, not as missing).
    """
    if not folder.is_dir():
        problems.append(f"{folder}: not a folder (expected the folder of {role}s)")
        return {}, set()
    files = io.list_image_files(folder)
    if not files:
        problems.append(f"{folder}: no {role} files (looked for {', '.join(io.IMAGE_EXTENSIONS)})")
    index: dict[str, Path] = {}
    refused = set()
    for path in files:
        stem = io.stem_of(path)
        if role == "mask" and path.suffix.lower() in (".jpg", ".jpeg"):
            problems.append(f"{path}: JPEG masks are refused (lossy compression changes labels); "
                            "save masks as PNG or TIFF")
            refused.add(stem)
        elif stem in index:
            problems.append(f"{path}: two {role}s share the stem {stem!r} "
                            f"({index[stem].name}); keep one")
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
    problems: list[str] = []
    if images_dir.resolve() == masks_dir.resolve():
        problems.append(f"{images_dir}: images and masks are the same folder; pairing is by "
                        "file stem, so put the masks in a folder of their own")
        return [], problems
    images, _ = _index_folder(images_dir, "image", problems)
    masks, refused = _index_folder(masks_dir, "mask", problems)
    if images and (masks or refused):
        problems += [f"{images[s]}: no mask with stem {s!r} in {masks_dir}"
                     for s in sorted(images.keys() - masks.keys() - refused)]
        problems += [f"{masks[s]}: no image with stem {s!r} in {images_dir}"
                     for s in sorted(masks.keys() - images.keys())]
    pairs = [(s, images[s], masks[s]) for s in sorted(images.keys() & masks.keys())]
    return pairs, problems


def read_dataset_metadata(path) -> tuple[dict, list[str]]:
    """Read an optional ``dataset.yaml`` (class/channel names, pixel size, description, ...).

    Parameters
    ----------
    path : path-like or None
        The YAML file; ``None`` gives the defaults.

    Returns
    -------
    meta : dict
        All of ``DATASET_KEYS``, ``None`` where not given.
    problems : list of str
        Unreadable file, unknown keys, wrong types; each names the file.
    """
    meta = dict.fromkeys(DATASET_KEYS)
    if path is None:
        return meta, []
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        return meta, [f"{path}: cannot read dataset metadata ({type(exc).__name__}: {exc})"]
    if not isinstance(loaded, dict):
        return meta, [f"{path}: expected a mapping of {', '.join(DATASET_KEYS)}"]
    problems = [f"{path}: unknown key {k!r}; allowed: {', '.join(DATASET_KEYS)}"
                for k in loaded if k not in DATASET_KEYS]
    checks = {
        "class_names": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "channel_names": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "pixel_size_um": lambda v: type(v) in (int, float) and v > 0,
        "description": lambda v: isinstance(v, str),
        "mask_kind": lambda v: v in ("class", "instance"),
        "ignore_label": lambda v: type(v) is int and v >= 0,
    }
    wanted = {"class_names": "a list of strings", "channel_names": "a list of strings",
              "pixel_size_um": "a positive number (micrometres per pixel)",
              "description": "a string", "mask_kind": "'class' or 'instance'",
              "ignore_label": "a non-negative integer"}
    for key, check in checks.items():
        if loaded.get(key) is not None:
            if check(loaded[key]):
                meta[key] = loaded[key]
            else:
                problems.append(f"{path}: {key} must be {wanted[key]}, got {loaded[key]!r}")
    return meta, problems


# ----------------------------------------------------------------------------- split, tiles


def split_stems(stems, train_fraction: float = 0.8, seed: int = 0) -> dict[str, list[str]]:
    """Split source images into train and test, reproducibly.

    Parameters
    ----------
    stems : iterable of str
        Source image stems (order does not matter: they are sorted first).
    train_fraction : float
        In ``(0, 1]``. ``1`` puts everything in train.
    seed : int
        Seed of ``numpy.random.default_rng`` for the shuffle.

    Returns
    -------
    dict
        ``{"train": [stems], "test": [stems]}``, each sorted. The test set has
        ``round_half_up((1 - train_fraction) * n)`` stems, clipped to ``1 .. n - 1`` when
        ``train_fraction < 1`` and ``n >= 2``; with ``n == 1`` the image goes to train.

    Raises
    ------
    ValueError
        If ``train_fraction`` is not in ``(0, 1]``.
    """
    if not 0 < train_fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    stems = sorted(stems)
    n = len(stems)
    n_test = 0
    if train_fraction < 1 and n >= 2:
        n_test = min(max(math.floor((1 - train_fraction) * n + 0.5), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    test = {stems[i] for i in order[:n_test]}
    return {"train": [s for s in stems if s not in test], "test": [s for s in stems if s in test]}


def load_split(split, stems: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Check a given split (a ``split.json`` path or a dict) against the paired stems.

    Parameters
    ----------
    split : path-like or dict
        ``{"train": [stems], "test": [stems]}`` with exactly these keys.
    stems : list of str
        Stems of the image/mask pairs found.

    Returns
    -------
    split : dict
        ``{"train": [...], "test": [...]}`` sorted (empty lists when it is unusable).
    problems : list of str
        Unreadable file, wrong structure, unknown stems, stems not assigned, stems in both.
    """
    name = "given split" if isinstance(split, dict) else str(split)
    empty = {"train": [], "test": []}
    if not isinstance(split, dict):
        try:
            split = json.loads(Path(split).read_text())
        except (OSError, ValueError) as exc:
            return empty, [f"{name}: cannot read the split ({type(exc).__name__}: {exc})"]
    if (not isinstance(split, dict) or set(split) != {"train", "test"}
            or not all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                       for v in split.values())):
        return empty, [f"{name}: expected {{\"train\": [stems], \"test\": [stems]}} "
                       "with exactly these two keys"]
    train, test, known = set(split["train"]), set(split["test"]), set(stems)
    problems = []
    if unknown := sorted((train | test) - known):
        problems.append(f"{name}: {len(unknown)} stem(s) with no image/mask pair: "
                        f"{', '.join(unknown)}")
    if both := sorted(train & test):
        problems.append(f"{name}: stem(s) in both train and test: {', '.join(both)}")
    if missing := sorted(known - train - test):
        problems.append(f"{name}: {len(missing)} image(s) not in the split: {', '.join(missing)}; "
                        "add them to train or test, or move the files away")
    if not train:
        problems.append(f"{name}: the train list is empty")
    return {"train": sorted(train), "test": sorted(test)}, problems


def tile_origins(height: int, width: int, tile_size: int | None,
                 tile_stride: int | None = None) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Top-left corners of the tiles that cover an image, with edge tiles shifted inside.

    Along each axis, tiles start at ``0, stride, 2 * stride, ...``; if the last one stops short
    of the edge, one more tile ends exactly at the edge (it overlaps its neighbour rather than
    reading padding). An axis not longer than the tile is kept whole.

    Parameters
    ----------
    height, width : int
        Image size, pixels.
    tile_size : int or None
        Tile side, pixels; ``None`` gives one sample, the whole image.
    tile_stride : int or None
        Step between tiles, pixels, ``1 .. tile_size``; ``None`` means ``tile_size``.

    Returns
    -------
    origins : list of (y, x)
        Row-major order, pixels.
    tile_shape : (int, int)
        ``(min(tile_size, height), min(tile_size, width))``.

    Raises
    ------
    ValueError
        For a non-positive tile size or a stride outside ``1 .. tile_size``.
    """
    if tile_size is None:
        return [(0, 0)], (height, width)
    stride = tile_size if tile_stride is None else tile_stride
    if tile_size < 1 or not 1 <= stride <= tile_size:
        raise ValueError(f"need tile_size >= 1 and 1 <= tile_stride <= tile_size (a larger "
                         f"stride skips pixels), got {tile_size} and {tile_stride}")

    def starts(length: int) -> list[int]:
        if length <= tile_size:
            return [0]
        out = list(range(0, length - tile_size + 1, stride))
        return out if out[-1] == length - tile_size else [*out, length - tile_size]

    origins = [(y, x) for y in starts(height) for x in starts(width)]
    return origins, (min(tile_size, height), min(tile_size, width))


# ----------------------------------------------------------------------------- validation


def _value_counts(values: np.ndarray) -> np.ndarray:
    """Pixels per value ``0..max`` of a non-negative integer array ``(H, W)``, int64.

    uint8 arrays below 2**24 pixels (where float32 counts are exact) use OpenCV's histogram,
    about 4x faster than ``numpy.bincount`` and free of the GIL.
    """
    if values.dtype == np.uint8 and values.ndim == 2 and values.size < (1 << 24):
        return cv2.calcHist([values], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    return np.bincount(values.ravel())


def _label_counts(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label values present in ``mask`` (H, W) and their pixel counts, both int64 (K,)."""
    if mask.size and int(mask.max()) < (1 << 20):
        counts = _value_counts(mask)
        labels = np.flatnonzero(counts)
        return labels.astype(np.int64), counts[labels]
    labels, counts = np.unique(mask, return_counts=True)
    return labels.astype(np.int64), counts.astype(np.int64)


def _check_pair(stem, image_path, mask_path, channel_axis, cache) -> tuple[Source | None, list]:
    """Read and check one pair; keep the arrays if ``cache`` (a callable nbytes -> bool) agrees."""
    problems, image, mask = [], None, None
    try:
        image = io.read_image(image_path, channel_axis)
    except io.ImageFileError as exc:
        problems.append(str(exc))
    try:
        mask = io.read_mask(mask_path)
    except io.ImageFileError as exc:
        problems.append(str(exc))
    if image is not None and mask is not None and image.shape[1:] != mask.shape:
        problems.append(f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but image "
                        f"{image_path.name} is {image.shape[1]}x{image.shape[2]}; a mask must "
                        "match its image pixel for pixel")
    if problems:
        return None, problems
    labels, counts = _label_counts(mask)
    keep = cache(image.nbytes + mask.nbytes)
    return Source(stem, image_path, mask_path, mask.shape, image.shape[0], image.dtype,
                  mask.dtype, labels, counts, image if keep else None,
                  mask if keep else None), []


def _check_pairs(pairs, channel_axis, progress, workers) -> tuple[list[Source], list[str]]:
    """Check all pairs on ``workers`` threads (decoders release the GIL); arrays cached."""
    lock, used = threading.Lock(), [0]

    def cache(nbytes: int) -> bool:
        with lock:
            if used[0] + nbytes > CACHE_BYTES:
                return False
            used[0] += nbytes
            return True

    sources, problems = [], []
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda p: _check_pair(*p, channel_axis, cache), pairs)
        for source, found in tqdm(results, total=len(pairs), desc="validate", unit="file",
                                  disable=None if progress else True):
            problems += found
            if source is not None:
                sources.append(source)
    return sources, problems


def _minority_problems(sources, attribute: str, what: str, fix: str) -> list[str]:
    """One line per file whose ``attribute`` differs from the most common value."""
    common, count = Counter(getattr(s, attribute) for s in sources).most_common(1)[0]
    return [f"{s.image_path}: {what} {getattr(s, attribute)}, but {count} image(s) have "
            f"{common}; {fix}" for s in sources if getattr(s, attribute) != common]


def _instance_dtype(dtypes: set, max_label: int) -> np.dtype:
    """Keep an instance mask dtype as read; promote mixed or 64-bit ones losslessly."""
    dtype = np.result_type(*dtypes)
    return dtype if dtype.itemsize <= 4 else io.smallest_label_dtype(max_label)


def check_dataset(sources: list[Source], meta: dict, mask_kind: str, meta_path) -> tuple[dict, list]:
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
    plan : dict
        ``channels``, ``image_dtype``, ``mask_dtype`` (numpy dtypes) and ``expand`` (stems
        whose single channel is repeated to ``channels``).
    problems : list of str
    """
    problems: list[str] = []
    counts = {s.channels for s in sources}
    channels = max(counts)
    if len(counts) > 1 and counts != {1, channels}:
        problems += _minority_problems(sources, "channels", "has channel count",
                                       "every image needs the same number of channels")
    image_dtype = np.result_type(*{s.image_dtype for s in sources})
    if image_dtype.name not in io.IMAGE_DTYPES:
        problems += _minority_problems(sources, "image_dtype", "has dtype",
                                       "convert the images to one dtype")
    elif len({s.image_dtype for s in sources}) > 1:
        log.warning("images have dtypes %s; storing all as %s (lossless)",
                    sorted({s.image_dtype.name for s in sources}), image_dtype)
    max_label = max(int(s.labels[-1]) if s.labels.size else 0 for s in sources)
    if mask_kind == "class":
        mask_dtype = io.smallest_label_dtype(max_label)
        names = meta["class_names"]
        top = max(int(s.labels[s.labels != meta["ignore_label"]].max(initial=0)) for s in sources)
        if names is not None and top >= len(names):
            worst = next(s for s in sources if top in s.labels)
            problems.append(f"{meta_path}: class_names has {len(names)} names but mask "
                            f"{worst.mask_path.name} holds label {top}; name every class id "
                            "0..max (or set ignore_label)")
    else:
        mask_dtype = _instance_dtype({s.mask_dtype for s in sources}, max_label)
    if meta["channel_names"] is not None and len(meta["channel_names"]) != channels:
        problems.append(f"{meta_path}: channel_names has {len(meta['channel_names'])} names but "
                        f"the images have {channels} channel(s)")
    expand = sorted(s.stem for s in sources if s.channels != channels)
    return {"channels": channels, "image_dtype": image_dtype, "mask_dtype": mask_dtype,
            "expand": expand}, problems


def validate_folders(images_dir, masks_dir, *, mask_kind: str = "class", metadata=None,
                     channel_axis: int | None = None, progress: bool = False,
                     workers: int | None = None) -> tuple[list[Source], dict, dict]:
    """Read every pair once and check everything; raise with all problems, or return the plan.

    Parameters
    ----------
    images_dir, masks_dir : path-like
    mask_kind : {"class", "instance"}
    metadata : path-like or None
        ``dataset.yaml``.
    channel_axis : {None, 0, -1}
        See :func:`scarce.io.to_chw`.
    progress : bool
        Show a progress bar (only on a terminal).
    workers : int or None
        Decoder threads; default ``min(8, os.cpu_count())``.

    Returns
    -------
    sources : list of Source
        Sorted by stem; arrays kept while they fit in ``CACHE_BYTES``.
    meta : dict
        The dataset metadata.
    plan : dict
        See :func:`check_dataset`.

    Raises
    ------
    IngestError
        With every problem found (files, folders, metadata).
    """
    pairs, problems = pair_files(images_dir, masks_dir)
    meta, meta_problems = read_dataset_metadata(metadata)
    workers = workers or min(8, os.cpu_count() or 1)
    sources, found = _check_pairs(pairs, channel_axis, progress, workers)
    problems += meta_problems + found
    plan: dict = {}
    if sources:
        plan, found = check_dataset(sources, meta, mask_kind, metadata)
        problems += found
    if problems:
        raise IngestError(problems)
    return sources, meta, plan


# ----------------------------------------------------------------------------- writing


class _IntensityStats:
    """Per-channel mean, std and 1st/99th percentiles over all pixels of a split.

    uint8/uint16 images are summarised by exact per-channel histograms, so all four numbers
    are exact. Other dtypes: mean and std are exact (means and squared deviations of each image
    combined pairwise), the percentiles come from a seeded uniform subsample of
    ``PERCENTILE_PIXELS`` pixels (all pixels if the split has fewer).

    References
    ----------
    Chan, Golub, LeVeque, "Algorithms for computing the sample variance: analysis and
    recommendations", The American Statistician 37(3):242-247 (1983),
    doi:10.1080/00031305.1983.10483115 (pairwise combination of means and squared deviations).
    """

    def __init__(self, channels: int, dtype: np.dtype, total_pixels: int,
                 rng: np.random.Generator):
        self.histogram = (np.zeros((channels, 1 << (8 * dtype.itemsize)), np.int64)
                          if dtype.kind == "u" and dtype.itemsize <= 2 else None)
        self.rate = min(1.0, PERCENTILE_PIXELS / max(total_pixels, 1))
        self.rng, self.n = rng, 0
        self.mean, self.m2 = np.zeros(channels), np.zeros(channels)
        self.samples: list[np.ndarray] = []

    def add(self, image: np.ndarray) -> None:
        """Fold in one source image ``(C, H, W)``; ``C == 1`` counts for every channel."""
        if self.histogram is not None:
            for c, values in enumerate(image):
                counts = _value_counts(values)
                self.histogram[c if len(image) > 1 else slice(None), :counts.size] += counts
            return
        flat = image.reshape(image.shape[0], -1)
        n = flat.shape[1]
        mean = flat.mean(axis=1, dtype=np.float64)
        m2 = flat.var(axis=1, dtype=np.float64) * n
        delta, total = mean - self.mean, self.n + n
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.n * n / total
        self.n = total
        if self.rate < 1:
            flat = flat[:, self.rng.integers(0, n, math.ceil(self.rate * n))]
        self.samples.append(np.broadcast_to(flat, (len(self.mean), flat.shape[1])).astype(float))

    def result(self) -> dict:
        """``{"mean", "std", "p1", "p99"}``, each a list with one float per channel."""
        if self.histogram is not None:
            return _histogram_stats(self.histogram)
        p1, p99 = np.percentile(np.concatenate(self.samples, axis=1), [1, 99], axis=1)
        std = np.sqrt(self.m2 / max(self.n, 1))
        return {"mean": self.mean.tolist(), "std": std.tolist(), "p1": p1.tolist(),
                "p99": p99.tolist()}


def _histogram_stats(histogram: np.ndarray) -> dict:
    """Mean, std and percentiles (``numpy.percentile``'s linear rule) of ``(C, V)`` counts."""
    out: dict = {"mean": [], "std": [], "p1": [], "p99": []}
    values = np.arange(histogram.shape[1], dtype=np.float64)
    for counts in histogram:
        n = max(int(counts.sum()), 1)
        mean = float(values @ counts / n)
        out["mean"].append(mean)
        out["std"].append(float(np.sqrt(((values - mean) ** 2) @ counts / n)))
        cumulative = np.cumsum(counts)
        for q in (1, 99):
            position = q / 100 * (n - 1)
            low = math.floor(position)
            v_low, v_high = np.searchsorted(cumulative, [low, min(low + 1, n - 1)], side="right")
            out[f"p{q}"].append(float(v_low + (position - low) * (v_high - v_low)))
    return out


def _arrays(source: Source, plan: dict, channel_axis) -> tuple[np.ndarray, np.ndarray]:
    """The pair's arrays (cached or decoded again) in the planned dtypes, channels as read."""
    if source.image is not None:
        image, mask = source.image, source.mask
        source.image = source.mask = None  # free the cache as we go
    else:
        image, mask = io.read_image(source.image_path, channel_axis), io.read_mask(source.mask_path)
        if mask.shape != source.shape or image.shape[1:] != source.shape:
            raise IngestError([f"{source.image_path}: changed while ingesting (was "
                               f"{source.shape}, now {image.shape[1:]}/{mask.shape})"])
    return image.astype(plan["image_dtype"], copy=False), mask.astype(plan["mask_dtype"], copy=False)


def _prefetch(function, items, workers: int):
    """``map(function, items)`` on threads, at most ``2 * workers`` results ahead."""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _classes_present(tile: np.ndarray, mask_kind: str) -> list[int]:
    """Label values in a mask tile; for instance masks 0 and/or 1 (background/foreground)."""
    if mask_kind == "instance":
        foreground = np.count_nonzero(tile)
        return [c for c, present in ((0, foreground < tile.size), (1, foreground > 0)) if present]
    return _label_counts(tile)[0].tolist()


def _map_size(sources: list[Source], plan: dict, tiling) -> int:
    """Generous LMDB map size for these sources, bytes (records are page-aligned)."""
    pixel_bytes = plan["channels"] * plan["image_dtype"].itemsize + plan["mask_dtype"].itemsize
    total = 0
    for s in sources:
        origins, (th, tw) = tile_origins(*s.shape, *tiling)
        total += len(origins) * (math.ceil(th * tw * pixel_bytes / 4096) + 2) * 4096 + 1024
    return int(total * 1.1) + (64 << 20)


def _write_split(db_path: Path, sources: list[Source], plan: dict, settings: dict,
                 rng: np.random.Generator, progress: bool) -> dict:
    """Write one split's records and metadata into ``db_path``; return the metadata."""
    kind, tiling = settings["mask_kind"], settings["tiling"]
    stats = _IntensityStats(plan["channels"], plan["image_dtype"],
                            sum(s.shape[0] * s.shape[1] for s in sources), rng)
    entries: list[dict] = []
    env = store.open_env(db_path, write=True, map_size=_map_size(sources, plan, tiling),
                         writemap=True)
    txn, pending, raw_bytes = env.begin(write=True), 0, 0
    try:
        arrays = _prefetch(lambda s: _arrays(s, plan, settings["channel_axis"]), sources,
                           settings["workers"])
        for source, (image, mask) in tqdm(zip(sources, arrays), total=len(sources),
                                          desc=db_path.stem, unit="file",
                                          disable=None if progress else True):
            stats.add(image)
            if image.shape[0] != plan["channels"]:
                image = np.repeat(image, plan["channels"], axis=0)  # lossless gray -> C
            origins, (th, tw) = tile_origins(*source.shape, *tiling)
            for y, x in origins:
                tile_mask = mask[y:y + th, x:x + tw]
                whole = (th, tw) == source.shape
                name = source.stem if whole else f"{source.stem}@{y},{x}"
                classes = (source.labels.tolist() if whole and kind == "class"
                           else _classes_present(tile_mask, kind))
                record = store.encode_sample(name, source.stem, (y, x),
                                             image[:, y:y + th, x:x + tw], tile_mask, classes)
                txn.put(store.sample_key(len(entries)), record, append=True)
                entries.append({"name": name, "source": source.stem, "origin": [y, x],
                                "shape": [th, tw], "classes": classes})
                pending += len(record)
                raw_bytes += image[:, :th, :tw].nbytes + tile_mask.nbytes
                if pending >= COMMIT_BYTES:
                    txn.commit()
                    txn, pending = env.begin(write=True), 0
        meta = _metadata(sources, plan, settings, entries, stats.result())
        meta["raw_bytes"] = raw_bytes
        txn.put(store.METADATA_KEY, json.dumps(meta, separators=(",", ":")).encode())
        txn.commit()
    except BaseException:
        txn.abort()
        env.close()
        raise
    store.close_writer(env)
    return meta


def _metadata(sources, plan, settings, entries, intensity) -> dict:
    """The metadata record of one split (keys documented in the module docstring of store)."""
    kind, dataset = settings["mask_kind"], settings["dataset"]
    counts: Counter = Counter()
    instances = 0
    for s in sources:
        if kind == "instance":
            foreground = int(s.counts[s.labels > 0].sum())
            counts.update({0: s.shape[0] * s.shape[1] - foreground, 1: foreground})
            instances += int(np.count_nonzero(s.labels))
        else:
            counts.update(dict(zip(s.labels.tolist(), s.counts.tolist())))
    tile_size, tile_stride = settings["tiling"]
    return {
        "format_version": store.FORMAT_VERSION, "split": settings["split"],
        "num_samples": len(entries), "channels": plan["channels"],
        "image_dtype": plan["image_dtype"].name, "mask_dtype": plan["mask_dtype"].name,
        "mask_kind": kind,
        "class_ids": [0, 1] if kind == "instance" else sorted(int(c) for c in counts),
        "class_pixel_counts": {str(c): int(n) for c, n in sorted(counts.items())},
        "num_instances": instances if kind == "instance" else None,
        "intensity": intensity, "source": settings["source"],
        "sources": [s.stem for s in sources],
        "source_files": {s.stem: [s.image_path.name, s.mask_path.name] for s in sources},
        "channel_expanded": [s.stem for s in sources if s.stem in set(plan["expand"])],
        "tiling": None if tile_size is None else {"tile_size": tile_size,
                                                  "tile_stride": tile_stride or tile_size},
        **{k: dataset[k] for k in ("class_names", "channel_names", "pixel_size_um",
                                   "description", "ignore_label")},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scarce_version": __version__, "samples": entries,
    }


# ----------------------------------------------------------------------------- ingest


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing ``out_dir`` unless overwriting one that holds only ingest output."""
    if not out_dir.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace "
                              "it or choose another output folder")
    if not out_dir.is_dir() or set(os.listdir(out_dir)) - OUTPUT_NAMES:
        raise FileExistsError(f"refusing to replace {out_dir}: it is not a Scarce database "
                              f"folder (it holds files other than {', '.join(sorted(OUTPUT_NAMES))})")


def _install(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` is moved aside, then deleted."""
    old = out_dir.parent / f".{out_dir.name}.old-{secrets.token_hex(4)}" if out_dir.exists() else None
    if old is not None:
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_arguments(tile_size, tile_stride, mask_kind, channel_axis, train_fraction) -> None:
    """Raise ValueError for arguments no file can fix (``train_fraction=None``: not used)."""
    tile_origins(1, 1, tile_size, tile_stride)  # checks the tiling arguments
    if mask_kind not in (None, "class", "instance"):
        raise ValueError(f"mask_kind must be 'class' or 'instance', got {mask_kind!r}")
    if channel_axis not in (None, 0, -1, 2):
        raise ValueError(f"channel_axis must be None, 0 or -1, got {channel_axis!r}")
    if train_fraction is not None and not 0 < train_fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")


def _write_databases(out_dir: Path, sources, chosen, plan, settings, seed, progress) -> dict:
    """Write the non-empty splits and ``split.json`` into a temp folder, then rename it in.

    Returns the metadata record of each split written. The temporary folder is removed on
    any exception, ``KeyboardInterrupt`` included, so ``out_dir`` is old or new, never half.
    """
    by_stem = {s.stem: s for s in sources}
    metas = {}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        seeds = np.random.SeedSequence(seed).spawn(2)
        for index, name in enumerate(("train", "test")):
            if chosen[name]:
                metas[name] = _write_split(
                    tmp / f"{name}.lmdb", [by_stem[s] for s in chosen[name]], plan,
                    {**settings, "split": name}, np.random.default_rng(seeds[index]), progress)
        (tmp / "split.json").write_text(json.dumps(chosen, indent=1) + "\n")
        _install(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return metas


def ingest(images_dir, masks_dir, out_dir, *, train_fraction: float = 0.8, seed: int = 0,
           split=None, tile_size: int | None = None, tile_stride: int | None = None,
           mask_kind: str | None = None, metadata=None, overwrite: bool = False,
           channel_axis: int | None = None, progress: bool = True,
           workers: int | None = None) -> dict:
    """Validate folders of images and masks and write ``out_dir/{train,test}.lmdb``.

    Parameters
    ----------
    images_dir, masks_dir : path-like
        Images ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` (TIFF, PNG, JPEG, BMP) and integer
        label masks ``(H, W)`` (TIFF, PNG, BMP), paired by file stem.
    out_dir : path-like
        ``DB_DIR``; receives ``train.lmdb``, ``test.lmdb`` (if the test split is not empty) and
        ``split.json``.
    train_fraction, seed : float, int
        Split rule, see :func:`split_stems`; ignored when ``split`` is given.
    split : path-like or dict or None
        ``{"train": [stems], "test": [stems]}`` naming every pair exactly once.
    tile_size, tile_stride : int or None
        Cut images into tiles (pixels), see :func:`tile_origins`; ``None`` stores whole images.
    mask_kind : {"class", "instance", None}
        ``None``: ``mask_kind`` of ``dataset.yaml``, else ``"class"``.
    metadata : path-like or None
        ``dataset.yaml``; default ``images_dir/dataset.yaml`` if it exists.
    overwrite : bool
        Replace an existing ``out_dir`` (only one holding ingest output).
    channel_axis : {None, 0, -1}
        Channel axis of 3D image files; ``None`` detects it (:func:`scarce.io.to_chw`).
    progress : bool
        Progress bars on stderr (off when it is not a terminal).
    workers : int or None
        Decoder threads; default ``min(8, os.cpu_count())``.

    Returns
    -------
    dict
        ``train``/``test`` (samples), ``train_sources``/``test_sources`` (images), ``out``,
        ``mask_kind``, ``channels``, ``image_dtype``, ``mask_dtype``, ``raw_bytes`` (image and
        mask bytes written) and ``seconds`` (``validate``, ``write``, ``total``).

    Raises
    ------
    ValueError
        For bad arguments (fraction, tiling, mask kind, channel axis).
    FileExistsError
        If ``out_dir`` exists and not ``overwrite``, or holds other files.
    IngestError
        With every validation problem; nothing is written.
    """
    start = time.perf_counter()
    images_dir, masks_dir, out_dir = Path(images_dir), Path(masks_dir), Path(out_dir)
    _check_arguments(tile_size, tile_stride, mask_kind, channel_axis,
                     None if split is not None else train_fraction)
    _check_out_dir(out_dir, overwrite)
    if metadata is None and (images_dir / "dataset.yaml").is_file():
        metadata = images_dir / "dataset.yaml"
    mask_kind = mask_kind or read_dataset_metadata(metadata)[0]["mask_kind"] or "class"
    workers = workers or min(8, os.cpu_count() or 1)
    sources, problems, dataset, plan = [], [], {}, {}
    try:
        sources, dataset, plan = validate_folders(
            images_dir, masks_dir, mask_kind=mask_kind, metadata=metadata,
            channel_axis=channel_axis, progress=progress, workers=workers)
    except IngestError as exc:
        problems = exc.problems
    stems = sorted(s.stem for s in sources)
    chosen, found = (split_stems(stems, train_fraction, seed), []) if split is None \
        else load_split(split, stems)
    if problems + found:
        raise IngestError(problems + found)
    if not chosen["test"]:
        level = logging.WARNING if split is None and train_fraction < 1 else logging.INFO
        log.log(level, "the test split is empty (%d image(s)): writing no test.lmdb", len(stems))
    validated = time.perf_counter()
    settings = {"mask_kind": mask_kind, "tiling": (tile_size, tile_stride), "dataset": dataset,
                "channel_axis": channel_axis, "workers": workers,
                "source": {"images": str(images_dir.resolve()), "masks": str(masks_dir.resolve())}}
    metas = _write_databases(out_dir, sources, chosen, plan, settings, seed, progress)
    end = time.perf_counter()
    summary = {name: metas[name]["num_samples"] if name in metas else 0
               for name in ("train", "test")}
    summary.update({f"{name}_sources": len(chosen[name]) for name in ("train", "test")})
    summary.update(out=str(out_dir), mask_kind=mask_kind, channels=plan["channels"],
                   image_dtype=plan["image_dtype"].name, mask_dtype=plan["mask_dtype"].name,
                   raw_bytes=sum(m["raw_bytes"] for m in metas.values()),
                   seconds={"validate": validated - start, "write": end - validated,
                            "total": end - start})
    log.info("ingested %d train / %d test samples into %s in %.1f s", summary["train"],
             summary["test"], out_dir, end - start)
    return summary

"""What ingest puts into a database: tiles, sample records and per-split statistics.

- :class:`StoragePlan`: the channel count and dtypes all samples are stored in (from the
  checks of :mod:`scarce.data.checks`);
- :func:`tile_origins` cuts a source image into tiles; :func:`encode_source` turns the
  arrays of one validated source image into ``(entry, record)`` pairs;
- :func:`label_counts` / :func:`class_pixel_counts`: pixels per label value of a mask and per
  class of a split, each source pixel counted once however the images are tiled;
- :class:`IntensityStats`: per-channel mean, std and 1st/99th percentiles of the images of a
  split, folded in one image at a time. The mean and std are exact over all pixels; the
  percentiles are exact for uint8/uint16 images (histograms) and for other dtypes up to
  ``PERCENTILE_PIXELS`` pixels per split, estimated beyond on a seeded uniform subsample;
- :func:`split_metadata`: the metadata record (keys listed in :mod:`scarce.data.ingest`).

References
----------
The NIST system Scarce replaces tiles images and stores the same kind of records in
``UNet/build_lmdb_tiling.py`` of https://github.com/usnistgov/semantic-segmentation-unet.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone

import cv2
import numpy as np

from scarce import __version__
from scarce.data import store
from scarce.errors import InputError

__all__ = [
    "IntensityStats",
    "StoragePlan",
    "class_pixel_counts",
    "encode_source",
    "label_counts",
    "map_bytes",
    "split_metadata",
    "tile_origins",
    "value_counts",
]

PERCENTILE_PIXELS = 2_000_000  # default pixels per split for the percentile estimate


# ----------------------------------------------------------------------------- tiles, records


@dataclass(frozen=True)
class StoragePlan:
    """How a validated dataset is stored: one channel count and dtype pair for all samples."""

    mask_kind: str  # "class" or "instance"
    channels: int  # C of every stored image; grayscale images are repeated to it
    image_dtype: np.dtype  # lossless common dtype of the images
    mask_dtype: np.dtype  # smallest unsigned dtype (class) or lossless common dtype (instance)
    label_map: tuple = ()  # (file value, stored value) pairs, e.g. ((255, 1),) for Fiji masks

    def remap(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` ``(H, W)`` with ``label_map`` applied (a new array only if it changes)."""
        for old, new in self.label_map:
            mask = np.where(mask == old, new, mask)
        return mask


def tile_origins(
    height: int, width: int, tile_size: int | None, tile_stride: int | None = None
) -> tuple[list[tuple[int, int]], tuple[int, int]]:
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
    InputError
        For a non-positive tile size or a stride outside ``1 .. tile_size``.
    """
    if tile_size is None:
        return [(0, 0)], (height, width)
    stride = tile_size if tile_stride is None else tile_stride
    if tile_size < 1 or not 1 <= stride <= tile_size:
        raise InputError(
            f"need tile_size >= 1 and 1 <= tile_stride <= tile_size (a larger "
            f"stride skips pixels), got {tile_size} and {tile_stride}"
        )

    def starts(length: int) -> list[int]:
        if length <= tile_size:
            return [0]
        out = list(range(0, length - tile_size + 1, stride))
        return out if out[-1] == length - tile_size else [*out, length - tile_size]

    origins = [(y, x) for y in starts(height) for x in starts(width)]
    return origins, (min(tile_size, height), min(tile_size, width))


def _classes_present(tile: np.ndarray, mask_kind: str) -> list[int]:
    """Label values in a mask tile; for instance masks 0 and/or 1 (background/foreground)."""
    if mask_kind == "instance":
        foreground = np.count_nonzero(tile)
        return [c for c, present in ((0, foreground < tile.size), (1, foreground > 0)) if present]
    return label_counts(tile)[0].tolist()


def encode_source(
    source, image: np.ndarray, mask: np.ndarray, plan: StoragePlan, tiling: tuple
) -> list[tuple[dict, bytes]]:
    """Sample records of one validated source image, one per tile.

    Parameters
    ----------
    source : scarce.data.checks.Source
        Stem, shape and labels of the pair.
    image : ndarray, shape (C_file, H, W), dtype ``plan.image_dtype``
        ``C_file`` is ``plan.channels`` or 1 (then repeated to ``plan.channels``).
    mask : ndarray, shape (H, W), dtype ``plan.mask_dtype``
    plan : StoragePlan
        Stored channel count, dtypes and mask kind.
    tiling : (int or None, int or None)
        ``(tile_size, tile_stride)``, pixels, see :func:`tile_origins`.

    Returns
    -------
    list of (dict, bytes)
        Row-major; the metadata entry ``{"name", "source", "origin", "shape", "classes"}``
        and the record of :func:`scarce.data.store.encode_sample` of each tile.
    """
    stored = image if len(image) == plan.channels else np.repeat(image, plan.channels, axis=0)
    origins, (th, tw) = tile_origins(*source.shape, *tiling)
    whole = (th, tw) == source.shape
    samples = []
    for y, x in origins:
        tile_mask = mask[y : y + th, x : x + tw]
        name = source.stem if whole else f"{source.stem}@{y},{x}"
        classes = (
            source.labels.tolist()
            if whole and plan.mask_kind == "class"
            else _classes_present(tile_mask, plan.mask_kind)
        )
        arrays = {"image": stored[:, y : y + th, x : x + tw], "mask": tile_mask}
        record = store.encode_sample(name, source.stem, (y, x), arrays, classes)
        samples.append(
            (
                {
                    "name": name,
                    "source": source.stem,
                    "origin": [y, x],
                    "shape": [th, tw],
                    "classes": classes,
                },
                record,
            )
        )
    return samples


def map_bytes(sources, plan: StoragePlan, tiling: tuple) -> int:
    """Generous LMDB map size for the records of these sources, bytes.

    Each record is counted as whole 4096-byte pages plus two (header, overflow page
    alignment) and 1 KiB for its metadata entry, plus 10 % and 4 MiB for the B-tree and the
    rest of the metadata record. The writer reserves this much disk space before it writes
    (:func:`scarce.data.store.open_env`), so the estimate stays close to the result.
    """
    pixel_bytes = plan.channels * plan.image_dtype.itemsize + plan.mask_dtype.itemsize
    total = 0
    for s in sources:
        origins, (th, tw) = tile_origins(*s.shape, *tiling)
        total += len(origins) * (math.ceil(th * tw * pixel_bytes / 4096) + 2) * 4096 + 1024
    return int(total * 1.1) + (4 << 20)


# ----------------------------------------------------------------------------- statistics


def value_counts(values: np.ndarray) -> np.ndarray:
    """Pixels per value ``0..max`` of a non-negative integer array.

    Parameters
    ----------
    values : ndarray, shape (H, W), unsigned or non-negative integer dtype

    Returns
    -------
    ndarray, shape (max + 1,), int64
        ``counts[v]`` = pixels equal to ``v``.

    Notes
    -----
    uint8 arrays below 2**24 pixels (where float32 counts are exact) use OpenCV's histogram,
    about 4x faster than ``numpy.bincount`` and free of the GIL.
    """
    if values.dtype == np.uint8 and values.ndim == 2 and values.size < (1 << 24):
        return cv2.calcHist([values], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    return np.bincount(values.ravel())


def label_counts(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label values present in a mask and their pixel counts.

    Parameters
    ----------
    mask : ndarray, shape (H, W), non-negative integer dtype

    Returns
    -------
    labels, counts : ndarray, shape (K,), int64
        Sorted label values present and pixels per value.
    """
    if mask.size and int(mask.max()) < (1 << 20):
        counts = value_counts(mask)
        labels = np.flatnonzero(counts)
        return labels.astype(np.int64), counts[labels]
    labels, counts = np.unique(mask, return_counts=True)
    return labels.astype(np.int64), counts.astype(np.int64)


def class_pixel_counts(sources, mask_kind: str) -> tuple[dict[int, int], int | None]:
    """Pixels per class over the source images of a split, and the instance count.

    Parameters
    ----------
    sources : list of scarce.data.checks.Source
        Each with ``shape`` (H, W) and ``labels``/``counts`` from :func:`label_counts`.
    mask_kind : {"class", "instance"}

    Returns
    -------
    counts : dict
        Class id -> pixels, sorted by id; instance masks count ``0`` (background) and ``1``
        (any instance).
    instances : int or None
        Instances over all sources (ids are per image) for instance masks, else ``None``.
    """
    counts: Counter = Counter()
    if mask_kind == "class":
        for s in sources:
            counts.update(dict(zip(s.labels.tolist(), s.counts.tolist())))
        return dict(sorted(counts.items())), None
    instances = 0
    for s in sources:
        foreground = int(s.counts[s.labels > 0].sum())
        counts.update({0: s.shape[0] * s.shape[1] - foreground, 1: foreground})
        instances += int(np.count_nonzero(s.labels))
    return dict(sorted(counts.items())), instances


class IntensityStats:
    """Per-channel mean, std and 1st/99th percentiles over all pixels of a split.

    uint8/uint16 images are summarised by exact per-channel histograms, so all four numbers
    are exact. Other dtypes: mean and std are exact (means and squared deviations of each image
    combined pairwise), the percentiles come from a seeded uniform subsample of
    ``max_samples`` pixels (all pixels if the split has fewer).

    Parameters
    ----------
    channels : int
        Channels ``C`` of the stored images.
    dtype : numpy.dtype
        Stored image dtype.
    total_pixels : int
        Pixels (H * W) of all images that will be added; sets the subsampling rate.
    rng : numpy.random.Generator
        Draws the subsample (not used for uint8/uint16).
    max_samples : int
        Pixels kept per channel for the percentile estimate.

    References
    ----------
    Chan, Golub, LeVeque, "Algorithms for computing the sample variance: analysis and
    recommendations", The American Statistician 37(3):242-247 (1983),
    doi:10.1080/00031305.1983.10483115 (pairwise combination of means and squared deviations).
    """

    def __init__(
        self,
        channels: int,
        dtype: np.dtype,
        total_pixels: int,
        rng: np.random.Generator,
        max_samples: int = PERCENTILE_PIXELS,
    ):
        self.histogram = (
            np.zeros((channels, 1 << (8 * dtype.itemsize)), np.int64)
            if dtype.kind == "u" and dtype.itemsize <= 2
            else None
        )
        self.rate = min(1.0, max_samples / max(total_pixels, 1))
        self.rng, self.n = rng, 0
        self.mean, self.m2 = np.zeros(channels), np.zeros(channels)
        self.samples: list[np.ndarray] = []

    def add(self, image: np.ndarray) -> None:
        """Fold in one source image ``(C, H, W)``; ``C == 1`` counts for every channel."""
        if self.histogram is not None:
            for c, values in enumerate(image):
                counts = value_counts(values)
                self.histogram[c if len(image) > 1 else slice(None), : counts.size] += counts
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
        return {
            "mean": self.mean.tolist(),
            "std": std.tolist(),
            "p1": p1.tolist(),
            "p99": p99.tolist(),
        }


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


def split_metadata(
    split: str,
    sources,
    plan: StoragePlan,
    entries: list[dict],
    intensity: dict,
    *,
    tiling: tuple,
    dataset: dict,
    folders: dict,
) -> dict:
    """The metadata record of one split (keys documented in :mod:`scarce.data.ingest`).

    Parameters
    ----------
    split : {"train", "test"}
    sources : list of scarce.data.checks.Source
        The split's source images, in key order.
    plan : StoragePlan
    entries : list of dict
        One per record, in key order, from :func:`encode_source`.
    intensity : dict
        :meth:`IntensityStats.result`.
    tiling : (int or None, int or None)
        ``(tile_size, tile_stride)``, pixels.
    dataset : dict
        From ``dataset.yaml`` (:func:`scarce.data.datasetyaml.read_dataset_metadata`).
    folders : dict
        ``{"images": path, "masks": path}``, absolute.
    """
    counts, instances = class_pixel_counts(sources, plan.mask_kind)
    tile_size, tile_stride = tiling
    pixel_bytes = plan.channels * plan.image_dtype.itemsize + plan.mask_dtype.itemsize
    return {
        "format_version": store.FORMAT_VERSION,
        "split": split,
        "num_samples": len(entries),
        "channels": plan.channels,
        "image_dtype": plan.image_dtype.name,
        "mask_dtype": plan.mask_dtype.name,
        "mask_kind": plan.mask_kind,
        "class_ids": [0, 1] if plan.mask_kind == "instance" else list(counts),
        "class_pixel_counts": {str(c): n for c, n in counts.items()},
        "label_map": {str(old): new for old, new in plan.label_map} or None,
        "num_instances": instances,
        "intensity": intensity,
        "source": folders,
        "sources": [s.stem for s in sources],
        "source_files": {s.stem: [s.image_path.name, s.mask_path.name] for s in sources},
        "channel_expanded": [s.stem for s in sources if s.channels != plan.channels],
        "tiling": None
        if tile_size is None
        else {"tile_size": tile_size, "tile_stride": tile_stride or tile_size},
        **{
            k: dataset[k]
            for k in (
                "class_names",
                "channel_names",
                "pixel_size_um",
                "description",
                "ignore_label",
                "authors",
                "license",
                "cite",
            )
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scarce_version": __version__,
        "samples": entries,
        "raw_bytes": sum(h * w for h, w in (e["shape"] for e in entries)) * pixel_bytes,
    }

"""What a run plan needs to know about the data: sizes, objects, scale, pixel sizes.

:func:`survey_database` reads the metadata records of the training (and test) database and up
to ``max_masks`` training masks, evenly spaced in key order (no randomness): image sizes,
channels, classes, the sizes of the objects (instances, or connected components of each class),
the scale table of :mod:`scarce.segment.scale` and the pixel sizes from ``dataset.yaml``.
"""

from __future__ import annotations

import os

import numpy as np

from scarce.data.store import SampleStore, read_metadata
from scarce.segment.scale import FACTORS, object_diameters, resized_shape, scale_table

MAX_MASK_PIXELS = 8_000_000  # the masks read for the survey hold at most this many pixels


def _mask_sample(train_db, shapes: np.ndarray, max_masks: int) -> list[np.ndarray]:
    """Up to ``max_masks`` training masks (and ``MAX_MASK_PIXELS``), evenly spaced by key."""
    count = len(shapes)
    mean_pixels = float(np.prod(shapes, axis=1).mean()) if count else 1.0
    wanted = min(count, max_masks, max(1, int(MAX_MASK_PIXELS // mean_pixels)))
    if wanted <= 0 or max_masks <= 0:
        return []
    picks = np.unique(np.linspace(0, count - 1, wanted).round().astype(int))
    with SampleStore(train_db) as store:
        return [store[int(i)].mask for i in picks]


def survey_database(
    train_db: str | os.PathLike,
    test_db: str | os.PathLike | None = None,
    *,
    max_masks: int = 32,
    factors=FACTORS,
) -> dict:
    """Facts about a training database (and its test database) for :mod:`scarce.segment.plan`.

    Parameters
    ----------
    train_db, test_db : path-like
        LMDB databases written by ``scarce ingest`` (``test_db`` may be None).
    max_masks : int
        Training masks read for object sizes and the scale table (evenly spaced by key; at
        most ``MAX_MASK_PIXELS`` pixels in all).
    factors : sequence of float
        Downscale factors of the scale table.

    Returns
    -------
    dict
        ``num_samples``; ``channels``; ``mask_kind``; ``ignore_label``; ``shapes``
        ``(N, 2)`` int (H, W of every training sample, pixels) as lists; ``min_side`` and
        ``max_side`` (pixels); ``pixel_size_um`` (train) and ``test_pixel_size_um`` (µm or
        None); ``test_shapes`` (H, W of every test sample, or ``[]``); ``diameters``:
        ``median``, ``p5``, ``p95`` and ``count`` of the objects' equivalent diameters
        (pixels; None when the masks hold no object); ``scale_table`` (rows of
        :func:`scarce.segment.scale.scale_ceiling`); ``masks_read``.

    Raises
    ------
    scarce.errors.StoreError
        If a database is missing or not a Scarce database.
    """
    meta = read_metadata(train_db)
    shapes = np.array([s["shape"] for s in meta["samples"]], dtype=np.int64).reshape(-1, 2)
    kind, ignore = meta["mask_kind"], meta.get("ignore_label")
    masks = _mask_sample(train_db, shapes, max_masks) if len(shapes) else []
    diameters = np.concatenate([object_diameters(m, kind, ignore) for m in masks] or [[]])
    test_meta = read_metadata(test_db) if test_db else None
    return {
        "num_samples": int(len(shapes)),
        "channels": int(meta["channels"]),
        "mask_kind": kind,
        "ignore_label": ignore,
        "shapes": shapes.tolist(),
        "min_side": int(shapes.min()) if len(shapes) else 0,
        "max_side": int(shapes.max()) if len(shapes) else 0,
        "pixel_size_um": meta.get("pixel_size_um"),
        "test_pixel_size_um": test_meta.get("pixel_size_um") if test_meta else None,
        "test_shapes": [s["shape"] for s in test_meta["samples"]] if test_meta else [],
        "diameters": {
            "count": int(diameters.size),
            **{
                k: float(np.percentile(diameters, q)) if diameters.size else None
                for k, q in (("median", 50), ("p5", 5), ("p95", 95))
            },
        },
        "scale_table": scale_table(masks, kind, factors, ignore) if masks else [],
        "masks_read": len(masks),
    }


def scaled_sides(facts: dict, factor: float) -> tuple[int, int]:
    """Smallest and largest training image side after shrinking by ``factor``, pixels."""
    sides = [resized_shape(tuple(s), factor) for s in facts["shapes"]] or [(0, 0)]
    return min(min(s) for s in sides), max(max(s) for s in sides)


__all__ = ["scaled_sides", "survey_database"]

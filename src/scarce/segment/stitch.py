"""Instances of an image larger than memory: labelled block by block, one id per object.

The block-wise counterpart of :func:`scarce.segment.predict.instances_from_prediction`, on
lazy class maps and probabilities (:mod:`scarce.segment.blockwise`):

1. **Seeds** (``semantic``/``class``: the foreground; ``boundary``: the interior class) are
   labelled with ``dask_image.ndmeasure.label``: each block on its own, then labels that
   touch across a block face are joined (a connected-components pass over the graph of
   touching labels), so an object cut by a block border gets **one** id, exactly as a
   whole-image ``scipy.ndimage.label`` gives it.
2. ``boundary`` targets grow the seeds by a watershed on ``1 - p_interior`` inside the
   foreground, block by block with ``depth`` pixels of context (``map_overlap``): the seed
   ids are global already, so the pieces fit together without seams; only flooding paths
   longer than ``depth``, and ties on exactly flat plateaus (broken by scan order, which
   differs inside a block), can differ from the whole-image watershed.
3. Objects under ``min_object_size`` pixels (global sizes, one ``bincount`` pass) are
   removed and the rest numbered ``1..N``.

Ids are consistent and sequential but numbered in block order, not in raster order.

References
----------
dask-image ``ndmeasure.label`` (block labels joined across faces);
Beucher S., Meyer F. (1993), the watershed transformation; scikit-image
``segmentation.watershed``.
"""

from __future__ import annotations

import numpy as np
from skimage.segmentation import watershed

LABEL_DTYPE = np.uint32


def _watershed_block(seeds, interior, classes) -> np.ndarray:
    """One extended block: seeds grown on ``1 - p_interior`` within the foreground."""
    return watershed(1.0 - interior, markers=seeds, mask=classes != 0).astype(LABEL_DTYPE)


def _relabel_block(block, lookup) -> np.ndarray:
    return lookup[block]


def label_objects(classes, interior, rule: str, *, depth: int = 64):
    """Lazy instance labels with one id per object across blocks (before size filtering).

    Parameters
    ----------
    classes : dask.array.Array, shape (H, W), integer
        Class map.
    interior : dask.array.Array, shape (H, W), float, or None
        ``p_interior`` (class 1) for ``boundary`` targets; unused otherwise.
    rule : {"semantic", "class", "boundary"}
        The checkpoint's target rule (see ``instances_from_prediction``).
    depth : int
        Context of the block-wise watershed, pixels (about one object diameter).

    Returns
    -------
    labels : dask.array.Array, shape (H, W), uint32
        0 = background; ids ``1..n`` (some may be unused after a watershed).
    n : int
        Number of seeds (computed here: one pass over the class map).

    Raises
    ------
    ValueError
        For an unknown rule, or ``boundary`` without ``interior``.
    """
    import dask.array as da
    from dask_image.ndmeasure import label

    if rule not in ("semantic", "class", "boundary"):
        raise ValueError(f"rule must be semantic, class or boundary, got {rule!r}")
    seeds, n = label(classes == 1 if rule == "boundary" else classes > 0)
    seeds = seeds.astype(LABEL_DTYPE)
    n = int(n.compute())
    if rule != "boundary":
        return seeds, n
    if interior is None:
        raise ValueError("a boundary target needs the interior probabilities")
    depth = min(int(depth), *(min(c) for c in classes.chunks))
    labels = da.map_overlap(
        _watershed_block,
        seeds,
        interior.rechunk(seeds.chunks),
        classes.rechunk(seeds.chunks),
        depth=depth,
        boundary="none",
        dtype=LABEL_DTYPE,
    )
    return labels, n


def remove_small_objects(
    labels, n: int, min_object_size: int, foreground=None, min_object_score: float = 0.0
):
    """Drop small or unsure objects and number the rest ``1..N`` (lazy).

    Parameters
    ----------
    labels : dask.array.Array, shape (H, W), uint32
        Ids ``0..n``.
    n : int
        Largest id.
    min_object_size : int
        Pixels; 0 keeps every object (ids are still made sequential).
    foreground : dask.array.Array, shape (H, W), float, optional
        ``1 - p_background``; needed when ``min_object_score`` > 0.
    min_object_score : float
        Objects whose mean ``foreground`` is below this go (as
        :func:`scarce.segment.predict.instances_from_prediction`, same result).

    Raises
    ------
    ValueError
        ``min_object_score`` > 0 without ``foreground``.

    Returns
    -------
    labels : dask.array.Array, shape (H, W), uint32
    count : int
        N, the number of objects kept.
    """
    import dask
    import dask.array as da

    if min_object_score > 0 and foreground is None:
        raise ValueError("min_object_score needs the foreground probabilities")
    counts = [da.bincount(labels.ravel(), minlength=n + 1)]
    if min_object_score > 0:
        weights = foreground.rechunk(labels.chunks).ravel()
        counts.append(da.bincount(labels.ravel(), weights=weights, minlength=n + 1))
    sizes, *total = dask.compute(*counts)  # one pass over the labels (a watershed per block)
    keep = sizes >= max(int(min_object_size), 1)
    if total:
        keep &= total[0] / np.maximum(sizes, 1) >= min_object_score
    keep[0] = False
    lookup = np.zeros(n + 1, dtype=LABEL_DTYPE)
    lookup[keep] = np.arange(1, int(keep.sum()) + 1, dtype=LABEL_DTYPE)
    relabelled = labels.map_blocks(_relabel_block, lookup=lookup, dtype=LABEL_DTYPE)
    return relabelled, int(keep.sum())


def instances(
    classes,
    interior,
    rule: str,
    *,
    min_object_size: int = 0,
    depth: int = 64,
    foreground=None,
    min_object_score: float = 0.0,
):
    """Block-wise instances: :func:`label_objects`, then :func:`remove_small_objects`.

    Parameters and returns as those two: lazy ``(H, W)`` uint32 labels ``1..N`` and ``N``.
    """
    labels, n = label_objects(classes, interior, rule, depth=depth)
    return remove_small_objects(labels, n, min_object_size, foreground, min_object_score)


__all__ = ["LABEL_DTYPE", "instances", "label_objects", "remove_small_objects"]

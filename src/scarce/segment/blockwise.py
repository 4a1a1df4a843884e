"""Block-wise prediction with Dask: images larger than memory, equal to whole-image prediction.

An image ``(C, H, W)`` held as a ``dask.array`` (e.g. an OME-Zarr level,
:mod:`scarce.data.omezarr`) is cut into chunks on the network's pooling grid; each chunk is
extended by a context ``depth`` (the network's halo rounded up to whole ``size_multiple``
cells) on every side that is not an image border (``dask.array.overlap``), normalised with
statistics computed **once** for the whole image, run through the same sliding window as
:func:`scarce.segment.predict.predict_image`, and cropped back. Every output pixel then sees
exactly the context it has in whole-image prediction, so probabilities agree to float rounding
(<= 1e-6 measured) and class maps are equal.

Exactness needs chunk starts and ``depth`` on the pooling grid (multiples of ``size_multiple``)
and every extended chunk at least one tile large (:func:`axis_chunks` merges a short last
chunk into its neighbour), so that image borders are padded as in whole-image prediction.

Workers load the model once per process from the checkpoint path (:func:`cached_model`), so
the graph carries a path, not the weights, and runs on a ``dask.distributed`` cluster
(:func:`dask_client`) as well as in this process.

References
----------
Dask ``dask.array.overlap`` / ``map_blocks`` (https://docs.dask.org/en/stable/array-overlap.html).
Ronneberger O. et al., MICCAI 2015, doi:10.1007/978-3-319-24574-4_28 (overlap-tile strategy).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import numpy as np
import torch

from scarce.data.normalize import noise_sigma, normalization_params, stat_step
from scarce.engine.checkpoint import load_model
from scarce.engine.tiling import sliding_window_logits
from scarce.errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_CHUNK = 2048  # block side, pixels (rounded to the network's size multiple)


def context_depth(model) -> int:
    """Context each block needs beyond its core: the halo in whole ``size_multiple`` cells, px."""
    multiple = int(getattr(model, "size_multiple", 1))
    return -(-int(getattr(model, "halo", 0)) // multiple) * multiple


def axis_chunks(size: int, chunk: int, tile: int, multiple: int) -> tuple[int, ...]:
    """Chunk sizes along one axis: ``chunk`` rounded to ``multiple``, a short tail merged.

    Parameters
    ----------
    size : int
        Axis length, pixels.
    chunk : int
        Wanted chunk side, pixels; rounded up to a multiple of ``multiple`` and to at least
        ``tile``.
    tile : int
        Sliding-window tile side, pixels: a last chunk shorter than this joins the one
        before it (whole-image prediction pads only to the pooling grid, so must a block).
    multiple : int
        The network's ``size_multiple``: every chunk but the last is a multiple of it.

    Returns
    -------
    tuple of int
        Sums to ``size``.
    """
    step = -(-max(int(chunk), int(tile)) // multiple) * multiple
    sizes = [step] * (size // step)
    rest = size - step * len(sizes)
    if rest and sizes and rest < tile:
        sizes[-1] += rest
    elif rest:
        sizes.append(rest)
    return tuple(sizes)


def image_statistics(image, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(offset, scale)`` of a whole Dask image, as whole-image prediction has it.

    Reads only the strided statistics sample (:func:`scarce.data.normalize.stat_step`), once,
    and for ``robust`` the row bands its noise estimate uses.

    Parameters
    ----------
    image : dask.array.Array, shape (C, H, W)
    spec : dict
        The checkpoint's normalisation spec.

    Returns
    -------
    offset, scale : ndarray of float32, shape (C,)
    """
    if spec.get("mode") == "dataset":  # no image statistics needed
        return normalization_params(np.zeros((image.shape[0], 1, 1), np.float32), spec)
    step = stat_step(image.shape[1], image.shape[2])
    sample = np.asarray(image[:, ::step, ::step].compute())
    noise = noise_sigma(image) if spec.get("mode") == "robust" else None  # reads row bands
    return normalization_params(sample, spec, sampled=True, noise=noise)


@functools.lru_cache(maxsize=2)
def cached_model(model_path: str, device: str, threads: int | None):
    """The model and checkpoint of ``model_path``, loaded once per (worker) process."""
    if threads:
        torch.set_num_threads(threads)
    return load_model(model_path, device)


def _block_probabilities(
    block, *, model_path, device, threads, offset, scale, depth, options, block_info=None
) -> np.ndarray:
    """Softmax probabilities ``(K, h, w)`` float32 of the core of one extended block."""
    model, _ = cached_model(model_path, device, threads)
    location, blocks = block_info[0]["chunk-location"], block_info[0]["num-chunks"]
    top = depth if location[1] > 0 else 0
    left = depth if location[2] > 0 else 0
    bottom = depth if location[1] < blocks[1] - 1 else 0
    right = depth if location[2] < blocks[2] - 1 else 0
    x = (block.astype(np.float32) - offset[:, None, None]) / scale[:, None, None]
    # every extended block is >= one tile, or spans its whole axis (axis_chunks), so it is
    # padded exactly as the whole image is
    logits = sliding_window_logits(model, torch.from_numpy(x), **options, device=device)
    probs = torch.softmax(logits, dim=0).numpy()
    return probs[:, top : probs.shape[1] - bottom, left : probs.shape[2] - right]


def probabilities(
    model_path,
    image,
    *,
    tile_size: int,
    overlap: float,
    blend: str,
    batch_size: int,
    chunk: int = DEFAULT_CHUNK,
    device: str = "cpu",
    threads: int | None = None,
):
    """Lazy class probabilities of a Dask image, block by block.

    Parameters
    ----------
    model_path : path-like
        Checkpoint file or run folder (workers load it themselves).
    image : dask.array.Array, shape (C, H, W)
        Raw image, any supported dtype.
    tile_size, overlap, blend, batch_size
        Sliding-window settings inside each block (as in ``predict_image``).
    chunk : int
        Block side, pixels (rounded up to the size multiple and to at least one tile).
    device : str
        Where the network runs on each worker (``"cpu"``, ``"cuda"``).
    threads : int, optional
        torch threads per worker process.

    Returns
    -------
    dask.array.Array, shape (K, H, W), float32
        Chunks ``(K, chunk, chunk)`` (the last ones may be longer by less than one tile).

    Raises
    ------
    scarce.errors.InputError
        If the channel count is not the model's, or the model was trained on downscaled
        images (``data.downscale``; not supported block-wise).
    """
    import dask.array as da

    model, ckpt = cached_model(str(model_path), "cpu", None)
    channels = int(ckpt["model"]["arguments"]["in_channels"])
    if image.ndim != 3 or image.shape[0] != channels:
        raise InputError(
            f"image has shape {tuple(image.shape)} (C, H, W) but the model takes "
            f"{channels}-channel images"
        )
    downscale = (ckpt["extras"].get("scale") or {}).get("downscale", 1)
    if downscale != 1:
        raise InputError(
            f"{model_path}: trained on images shrunk {downscale}x (data.downscale); block-wise "
            "prediction does not shrink blocks yet: predict the image as a file (scarce "
            "predict IMAGE.tif) or train without data.downscale"
        )
    multiple, depth = int(model.size_multiple), context_depth(model)
    tile = -(-int(tile_size) // multiple) * multiple
    chunks = tuple(axis_chunks(n, chunk, tile, multiple) for n in image.shape[1:])
    image = image.rechunk(((channels,), *chunks))
    offset, scale = image_statistics(image, ckpt["extras"]["normalization"])
    extended = da.overlap.overlap(image, depth={0: 0, 1: depth, 2: depth}, boundary="none")
    options = dict(tile_size=tile, overlap=overlap, blend=blend, batch_size=batch_size)
    num_classes = int(model.num_classes)
    return extended.map_blocks(
        _block_probabilities,
        model_path=str(model_path),
        device=str(device),
        threads=threads,
        offset=offset,
        scale=scale,
        depth=depth,
        options=options,
        chunks=((num_classes,), *chunks),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
    )


def class_map(probs):
    """Argmax over classes of lazy probabilities ``(K, H, W)``: ``(H, W)`` uint8 (K <= 256)."""
    dtype = np.uint8 if probs.shape[0] <= 256 else np.uint16
    return probs.argmax(axis=0).astype(dtype)


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None, *, memory="2GB"):
    """A ``dask.distributed`` client for the duration of a ``with`` block, or none.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``; e.g. started by dask-jobqueue's
        ``SLURMCluster`` or ``dask scheduler``).
    workers : int, optional
        Start a local cluster of this many single-threaded worker processes instead
        (torch uses ``cpu_count // workers`` threads in each).
    memory : str
        Memory limit per local worker (dask spills, then pauses, above it).

    Yields
    ------
    distributed.Client or None
        ``None`` when neither is given: Dask's synchronous scheduler in this process.

    Raises
    ------
    scarce.errors.InputError
        If both are given, ``workers < 1``, or ``distributed`` is not installed.
    """
    if scheduler and workers:
        raise InputError("give either --dask-scheduler or --workers, not both")
    if not scheduler and not workers:
        import dask

        with dask.config.set(scheduler="synchronous"):
            yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise InputError(
            f"a Dask cluster needs the optional package distributed ({exc}); "
            "pip install 'scarce[zarr]'"
        ) from exc
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    if int(workers) < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    with (
        LocalCluster(
            n_workers=int(workers),
            threads_per_worker=1,
            processes=True,
            memory_limit=memory,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def worker_threads(client, workers: int | None) -> int | None:
    """torch threads per worker process: the cores divided among the local workers."""
    if client is None or not workers:
        return None
    return max(1, (os.cpu_count() or 1) // int(workers))


__all__ = [
    "DEFAULT_CHUNK",
    "axis_chunks",
    "cached_model",
    "class_map",
    "context_depth",
    "dask_client",
    "image_statistics",
    "probabilities",
    "worker_threads",
]

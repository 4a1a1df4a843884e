"""Prediction past one machine's memory: OME-Zarr images block-wise, folders over a cluster.

:func:`predict_any` (``scarce predict``) sends each input where it fits:

- an OME-Zarr image (``.zarr``/``.ome.zarr``) is predicted block-wise
  (:mod:`scarce.segment.blockwise`, :mod:`scarce.segment.stitch`) into ``<stem>.ome.zarr``:
  the probabilities ``(K, H, W)`` float32 as the group's image (or the class map when they are
  not asked for), ``labels/class_map`` and, with ``instances``, ``labels/instances``, with the
  pixel size in micrometres;
- TIFF/PNG/JPEG/BMP files go through :func:`scarce.segment.predict.predict_files`, in this
  process, or one task per image on a ``dask.distributed`` cluster (``scheduler`` or
  ``workers``) when there are many.

Block-wise prediction writes what the network gives (probabilities, or the class map) first,
then derives the rest (class-map label image, instances) from the written arrays: the network
runs once per pixel (a single Dask graph storing two arrays that share the network would run
it once per store), and no worker holds more than a few blocks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from scarce.data.omezarr import is_zarr, open_image, open_labels, staged, write_image, write_labels
from scarce.engine.distributed import resolve_device
from scarce.errors import InputError, MissingInputError
from scarce.io import IMAGE_EXTENSIONS, list_image_files
from scarce.segment import blockwise, stitch
from scarce.segment.predict import (
    _make_out_dir,
    _predict_options,
    check_channels,
    instance_options,
    pixel_size_of,
    predict_files,
)
from scarce.segment.task import target_of

logger = logging.getLogger(__name__)


def zarr_stem(path: Path) -> str:
    """``a/b/slide.ome.zarr`` -> ``slide``."""
    name = path.name
    for suffix in (".ome.zarr", ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _write_instances(group: Path, model_path, rule: str, options: dict, chunk: int, px):
    """Second pass: instances from the written class map (and probabilities)."""
    model, _ = blockwise.cached_model(str(model_path), "cpu", None)
    classes = open_labels(group, "class_map")
    stored = open_image(group).array  # probabilities when the rule or the score needs them
    interior = stored[1] if rule == "boundary" else None
    foreground = 1.0 - stored[0] if options["min_object_score"] > 0 else None
    depth = max(64, 2 * blockwise.context_depth(model))
    labels, count = stitch.instances(
        classes, interior, rule, depth=depth, foreground=foreground, **options
    )
    write_labels(group, "instances", labels, pixel_size_um=px, chunks=chunk)
    return count


def predict_zarr(
    model_path,
    image_path,
    out_dir,
    *,
    probabilities: bool = False,
    instances: bool = False,
    chunk: int = blockwise.DEFAULT_CHUNK,
    device: str = "cpu",
    threads: int | None = None,
    pixel_size_um: float | None = None,
    **options,
) -> dict:
    """Predict one OME-Zarr image block-wise into ``out_dir/<stem>.ome.zarr``.

    Parameters
    ----------
    model_path : path-like
        Checkpoint file or run folder.
    image_path : path-like
        ``.zarr``/``.ome.zarr`` image (:func:`scarce.data.omezarr.open_image`).
    out_dir : path-like
        Created if missing; ``<stem>.ome.zarr`` is written atomically (temp, then rename).
    probabilities : bool
        Store the probabilities ``(K, H, W)`` float32 as the group's image (always done with
        ``instances`` for ``boundary`` models, whose watershed reads them back, and when
        ``predict.min_object_score`` > 0, whose object scores do).
    instances : bool
        Also write ``labels/instances`` (one id per object across blocks, uint32).
    chunk : int
        Block side, pixels; also the chunk side on disk.
    device : str
        Where each worker runs the network.
    threads : int, optional
        torch threads per worker.
    pixel_size_um : float, optional
        Overrides the image's pixel size (else the training data's).
    **options
        ``tile_size``, ``overlap``, ``blend``, ``batch_size`` (``None``: the checkpoint's).

    Returns
    -------
    dict
        ``image``, ``output``, ``shape`` (H, W), ``instances`` (count or None), ``seconds``.

    Raises
    ------
    scarce.errors.InputError
        Channel count not the model's, ``tta`` asked for, or the output would overwrite the
        input.
    """
    start = time.perf_counter()
    image_path, out_dir = Path(image_path), _make_out_dir(out_dir)
    if options.pop("tta", None):
        raise InputError("--tta is not available for block-wise (OME-Zarr) prediction")
    lazy = open_image(image_path)
    _, ckpt = blockwise.cached_model(str(model_path), "cpu", None)
    check_channels(lazy.array.shape[0], ckpt, name=str(image_path))
    out = out_dir / f"{zarr_stem(image_path)}.ome.zarr"
    if out.resolve() == image_path.resolve():
        raise InputError(f"{out}: the output would replace the input image; choose another --out")
    keys = ("tile_size", "overlap", "blend", "batch_size")
    opts = _predict_options(ckpt, **{k: options.get(k) for k in keys})
    rule, px = target_of(ckpt).rule, pixel_size_of(ckpt, pixel_size_um or lazy.pixel_size_um)
    probs = blockwise.probabilities(
        model_path, lazy.array, chunk=chunk, device=device, threads=threads, **opts
    )
    instance_opts = instance_options(ckpt)
    keep = probabilities or (
        instances and (rule == "boundary" or instance_opts["min_object_score"] > 0)
    )
    count = None
    with staged(out) as group:
        # pass 1, the network: the group's image (probabilities or class map), once per pixel
        image = probs if keep else blockwise.class_map(probs)
        write_image(group, image, pixel_size_um=px, chunks=chunk)
        # pass 2, from the store: the class map label image, then instances
        stored = open_image(group).array
        classes = blockwise.class_map(stored) if keep else stored[0]
        write_labels(group, "class_map", classes, pixel_size_um=px, chunks=chunk)
        if instances:
            count = _write_instances(group, model_path, rule, instance_opts, chunk, px)
    seconds = time.perf_counter() - start
    logger.info(
        "%s: %dx%d block-wise in %.1f s -> %s", image_path.name, *probs.shape[1:], seconds, out
    )
    return {
        "image": str(image_path),
        "output": str(out),
        "shape": tuple(probs.shape[1:]),
        "instances": count,
        "seconds": seconds,
    }


def _inputs(images) -> tuple[list[Path], list[Path]]:
    """(Zarr images, other image files) of a path: one Zarr, one file, or a folder of both."""
    path = Path(images)
    if is_zarr(path):
        return [path], []
    if path.is_dir():
        zarrs = sorted(p for p in path.iterdir() if p.is_dir() and is_zarr(p))
        files = list_image_files(path)
        if not zarrs and not files:
            raise MissingInputError(
                f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}, .zarr) in this folder"
            )
        return zarrs, files
    return [], [path]


def _predict_one_file(model_path, file: str, out_dir: str, threads, options: dict) -> list:
    """A cluster task: one image file through :func:`predict_files` (model loaded per task)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    return predict_files(model_path, file, out_dir, progress=False, **options)


def predict_any(
    model_path,
    images,
    out_dir,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    chunk: int = blockwise.DEFAULT_CHUNK,
    probabilities: bool = False,
    instances: bool = False,
    device: str = "auto",
    pixel_size_um: float | None = None,
    **options,
) -> list[dict]:
    """``scarce predict``: Zarr images block-wise, image files whole, on a cluster if asked.

    Parameters
    ----------
    model_path, images, out_dir
        As :func:`scarce.segment.predict.predict_files`; ``images`` may also be a
        ``.zarr``/``.ome.zarr`` image or a folder holding some.
    scheduler : str, optional
        Address of a ``dask.distributed`` scheduler (e.g. from dask-jobqueue on SLURM).
    workers : int, optional
        Start a local cluster of this many worker processes instead.
    chunk : int
        Block side of block-wise prediction, pixels.
    probabilities, instances, device, pixel_size_um, **options
        As :func:`predict_files` (``tile_size``, ``overlap``, ``blend``, ``tta``,
        ``batch_size``, ``fmt``).

    Returns
    -------
    list of dict
        One row per image (:func:`predict_zarr` or :func:`predict_files` rows).
    """
    zarrs, files = _inputs(images)
    common = dict(probabilities=probabilities, instances=instances, pixel_size_um=pixel_size_um)
    rows: list[dict] = []
    with blockwise.dask_client(scheduler, workers) as client:
        threads = blockwise.worker_threads(client, workers)
        block_device = str(resolve_device(device))  # the workers run where the client would
        zarr_options = {k: v for k, v in options.items() if k != "fmt"}
        for path in zarrs:
            rows.append(
                predict_zarr(
                    model_path,
                    path,
                    out_dir,
                    chunk=chunk,
                    device=block_device,
                    threads=threads,
                    **common,
                    **zarr_options,
                )
            )
        if files and client is None:
            folder = images if not zarrs and Path(images).is_dir() else None
            for target in [folder] if folder else files:
                rows += predict_files(
                    model_path, target, out_dir, device=device, **common, **options
                )
        elif files:
            _make_out_dir(out_dir)
            tasks = [dict(device=device, **common, **options)] * len(files)
            futures = client.map(
                _predict_one_file,
                [model_path] * len(files),
                [str(f) for f in files],
                [str(out_dir)] * len(files),
                [threads] * len(files),
                tasks,
                pure=False,
            )
            rows += [row for result in client.gather(futures) for row in result]
    return rows


__all__ = ["predict_any", "predict_zarr", "zarr_stem"]

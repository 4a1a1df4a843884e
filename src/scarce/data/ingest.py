"""Folders of images and masks -> ``DB_DIR/train.lmdb``, ``DB_DIR/test.lmdb`` and ``split.json``.

Three steps, in this order:

1. **Validate** every image/mask pair (:mod:`scarce.data.checks`): pairing by file stem,
   the file checks of :mod:`scarce.io`, shape agreement, channel counts, dtypes and the
   optional ``dataset.yaml``. All problems are collected; if there is any, :class:`IngestError`
   lists them (one line each, naming the file) and nothing is written.
2. **Split by source image** (:func:`split_stems`) before tiling, so the tiles of one image
   never land in both splits; or take a given split (``split.json`` or a dict).
3. **Write** each split into a temporary directory beside ``DB_DIR``, then rename it into
   place: a crash or Ctrl-C leaves the old database or none, never half of one. Worker
   threads decode (if needed), tile and encode the next images (:mod:`scarce.data.records`)
   while the main thread writes and folds in the statistics.

Decoded arrays from step 1 are kept for step 3 while they fit in ``CACHE_BYTES``; files beyond
that are decoded again, on the worker threads (measured on dsb2018 in
``benchmarks/results/ingest.md``).

Rules where the issue left a choice:

- Split: see :mod:`scarce.data.split`. Without a test split no ``test.lmdb`` is written.
- Channels, dtypes and masks: see :mod:`scarce.data.consistency`; statistics: see
  :mod:`scarce.data.records`.

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
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from scarce.data import install, store
from scarce.data.checks import (
    CACHE_BYTES,
    IngestError,
    Source,
    check_folders,
    map_ahead,
)
from scarce.data.records import (
    PERCENTILE_PIXELS,
    IntensityStats,
    StoragePlan,
    encode_source,
    map_bytes,
    split_metadata,
    tile_origins,
)
from scarce.data.sources import FileReader, parse_label_map
from scarce.data.split import load_split, split_stems
from scarce.errors import InputError

__all__ = ["OUTPUT_NAMES", "ingest"]

log = logging.getLogger(__name__)

OUTPUT_NAMES = {"train.lmdb", "test.lmdb", "split.json"}  # what an overwrite may replace
COMMIT_BYTES = 64 << 20  # bytes of records per write transaction
# ingest() reads CACHE_BYTES and PERCENTILE_PIXELS (imported above) from this module.


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Job:
    """What every split of one ingest shares besides the storage plan."""

    tiling: tuple[int | None, int | None]  # (tile_size, tile_stride), pixels
    reader: FileReader
    workers: int
    dataset: dict  # from dataset.yaml
    folders: dict  # {"images": folder, "masks": folder}, absolute


def _records(source: Source, plan: StoragePlan, job: _Job):
    """Image as read and records of one source (on a worker thread); decodes again if needed."""
    if source.image is not None:
        image, mask = source.image, source.mask
        source.image = source.mask = None  # free the cache as we go
    else:
        image = job.reader.image(source.image_path)
        mask = job.reader.mask(source.mask_path)
        if mask.shape != source.shape or image.shape[1:] != source.shape:
            raise IngestError(
                [
                    f"{source.image_path}: changed while ingesting (was "
                    f"{source.shape}, now {image.shape[1:]}/{mask.shape})"
                ]
            )
    image = image.astype(plan.image_dtype, copy=False)
    mask = plan.remap(mask).astype(plan.mask_dtype, copy=False)
    return image, encode_source(source, image, mask, plan, job.tiling)


def _write_split(
    db_path: Path,
    sources: list[Source],
    plan: StoragePlan,
    job: _Job,
    rng: np.random.Generator,
    progress: bool,
) -> dict:
    """Write one split's records and metadata into ``db_path``; return the metadata.

    Worker threads decode (if not cached), tile and encode the next sources while this thread
    folds in the statistics and puts the records, committing every ``COMMIT_BYTES``.
    """
    stats = IntensityStats(
        plan.channels,
        plan.image_dtype,
        sum(s.shape[0] * s.shape[1] for s in sources),
        rng,
        PERCENTILE_PIXELS,
    )
    entries: list[dict] = []
    env = store.open_env(
        db_path, write=True, map_size=map_bytes(sources, plan, job.tiling), writemap=True
    )
    txn, pending = env.begin(write=True), 0
    try:
        encoded = map_ahead(lambda s: _records(s, plan, job), sources, job.workers)
        for image, samples in tqdm(
            encoded,
            total=len(sources),
            desc=db_path.stem,
            unit="file",
            disable=None if progress else True,
        ):
            stats.add(image)
            for entry, record in samples:
                txn.put(store.sample_key(len(entries)), record, append=True)
                entries.append(entry)
                pending += len(record)
                if pending >= COMMIT_BYTES:
                    txn.commit()
                    txn, pending = env.begin(write=True), 0
        meta = split_metadata(
            db_path.stem,
            sources,
            plan,
            entries,
            stats.result(),
            tiling=job.tiling,
            dataset=job.dataset,
            folders=job.folders,
        )
        txn.put(store.METADATA_KEY, json.dumps(meta, separators=(",", ":")).encode())
        txn.commit()
    except BaseException:
        txn.abort()
        env.close()
        raise
    store.close_writer(env)
    return meta


# ----------------------------------------------------------------------------- ingest


def _check_arguments(
    tile_size, tile_stride, mask_kind, channel_axis, train_fraction, num_classes=None
) -> None:
    """Raise InputError for arguments no file can fix (``train_fraction=None``: not used)."""
    tile_origins(1, 1, tile_size, tile_stride)  # checks the tiling arguments
    if mask_kind not in (None, "class", "instance"):
        raise InputError(f"mask_kind must be 'class' or 'instance', got {mask_kind!r}")
    if channel_axis not in (None, 0, -1, 2):
        raise InputError(f"channel_axis must be None, 0 or -1, got {channel_axis!r}")
    if train_fraction is not None and not 0 < train_fraction <= 1:
        raise InputError(f"train_fraction must be in (0, 1], got {train_fraction}")
    if num_classes is not None and num_classes < 2:
        raise InputError(f"num_classes must be >= 2 (background and a class), got {num_classes}")


def _write_databases(out_dir: Path, sources, chosen, plan, job, seed, progress) -> dict:
    """Write the non-empty splits and ``split.json`` into a temp folder, then rename it in.

    Returns the metadata record of each split written. The temporary folder is removed on
    any exception, ``KeyboardInterrupt`` included, so ``out_dir`` is old or new, never half.
    """
    by_stem = {s.stem: s for s in sources}
    seeds = dict(zip(("train", "test"), np.random.SeedSequence(seed).spawn(2)))
    metas = {}
    with install.install_folder(out_dir, overwrite=True, replaceable=OUTPUT_NAMES) as tmp:
        for name in (n for n in ("train", "test") if chosen[n]):
            metas[name] = _write_split(
                tmp / f"{name}.lmdb",
                [by_stem[s] for s in chosen[name]],
                plan,
                job,
                np.random.default_rng(seeds[name]),
                progress,
            )
        (tmp / "split.json").write_text(json.dumps(chosen, indent=1) + "\n")
    return metas


def ingest(
    images_dir,
    masks_dir,
    out_dir,
    *,
    train_fraction: float = 0.8,
    seed: int = 0,
    split=None,
    tile_size: int | None = None,
    tile_stride: int | None = None,
    mask_kind: str | None = None,
    metadata=None,
    overwrite: bool = False,
    channel_axis: int | None = None,
    progress: bool = True,
    workers: int | None = None,
    num_classes: int | None = None,
    label_map: str | None = None,
) -> dict:
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
    num_classes : int or None
        Confirms the class count of class masks: ids must be below it, ids above 255 are then
        accepted, and 0/255 masks are not read as Fiji binary masks
        (:mod:`scarce.data.consistency`).
    label_map : str or None
        Mask values -> class ids, e.g. ``"ilastik"`` (0 -> ignore, k -> k - 1) or
        ``"0:ignore,1:0,2:1"`` (:func:`scarce.data.sources.parse_label_map`). Images and masks
        may also be ``.zarr``/``.ome.zarr`` folders.

    Returns
    -------
    dict
        ``train``/``test`` (samples), ``train_sources``/``test_sources`` (images), ``out``,
        ``mask_kind``, ``channels``, ``image_dtype``, ``mask_dtype``, ``raw_bytes`` (image and
        mask bytes written) and ``seconds`` (``validate``, ``write``, ``total``).

    Raises
    ------
    InputError
        For bad arguments (fraction, tiling, mask kind, channel axis).
    FileExistsError
        If ``out_dir`` exists and not ``overwrite``, or holds other files.
    IngestError
        With every validation problem; nothing is written.
    """
    start = time.perf_counter()
    images_dir, masks_dir, out_dir = Path(images_dir), Path(masks_dir), Path(out_dir)
    _check_arguments(
        tile_size,
        tile_stride,
        mask_kind,
        channel_axis,
        None if split is not None else train_fraction,
        num_classes,
    )
    install.check_output_folder(out_dir, overwrite=overwrite, replaceable=OUTPUT_NAMES)
    if metadata is None and (images_dir / "dataset.yaml").is_file():
        metadata = images_dir / "dataset.yaml"
    workers = workers or min(8, os.cpu_count() or 1)
    sources, dataset, plan, problems = check_folders(
        images_dir,
        masks_dir,
        mask_kind=mask_kind,
        metadata=metadata,
        reader=(reader := FileReader(channel_axis, parse_label_map(label_map))),
        progress=progress,
        workers=workers,
        cache_bytes=CACHE_BYTES,
        num_classes=num_classes,
    )
    stems = [s.stem for s in sources]
    chosen, found = (
        (split_stems(stems, train_fraction, seed), [])
        if split is None
        else load_split(split, stems)
    )
    if problems + found:
        raise IngestError(problems + found)
    if not chosen["test"]:
        level = logging.WARNING if split is None and train_fraction < 1 else logging.INFO
        log.log(level, "the test split is empty (%d image(s)): writing no test.lmdb", len(stems))
    validated = time.perf_counter()
    job = _Job(
        (tile_size, tile_stride),
        reader.for_dataset(dataset),
        workers,
        dataset,
        {"images": str(images_dir.resolve()), "masks": str(masks_dir.resolve())},
    )
    metas = _write_databases(out_dir, sources, chosen, plan, job, seed, progress)
    end = time.perf_counter()
    summary = {
        name: metas[name]["num_samples"] if name in metas else 0 for name in ("train", "test")
    }
    summary.update({f"{name}_sources": len(chosen[name]) for name in ("train", "test")})
    summary.update(
        out=str(out_dir),
        mask_kind=plan.mask_kind,
        channels=plan.channels,
        image_dtype=plan.image_dtype.name,
        mask_dtype=plan.mask_dtype.name,
        raw_bytes=sum(m["raw_bytes"] for m in metas.values()),
        seconds={"validate": validated - start, "write": end - validated, "total": end - start},
    )
    log.info(
        "ingested %d train / %d test samples into %s in %.1f s",
        summary["train"],
        summary["test"],
        out_dir,
        end - start,
    )
    return summary

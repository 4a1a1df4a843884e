"""Training and test readers: LMDB samples -> augmented, normalised batches.

Worker processes (a torch ``DataLoader`` over an ``IterableDataset``, forked from a clean
fork server) each open the LMDB environment read-only and build whole batches: pick a sample
(uniformly or class-balanced), pick a patch centre, cut and augment the patch straight from
the zero-copy LMDB views (:func:`scarce.data.augment.augment_patch`), normalise it with per-sample
parameters cached in the worker, and turn the mask into a class map with the run's
:class:`~scarce.segment.targets.TargetSpec`. With ``augment.empty_field_p`` a patch is instead
a synthetic empty field (:func:`scarce.data.empty.empty_crop`) normalised on its own.

Batch ``b`` is drawn from its own generator, ``SeedSequence(seed, spawn_key=(rank, b))``, so
its content depends only on the seed, the DDP rank, ``b`` and the config: never on the number
of workers or on timing, and training resumes the stream exactly from ``start_batch``.

The process machinery (fork server, DataLoader wiring, watchdog,
:class:`~scarce.data.workers.TrainBatches`) lives in :mod:`scarce.data.workers`: a worker that
dies raises :class:`~scarce.errors.ReaderError` in the consumer within about 5 s; one that
hangs is killed after ``scarce.data.workers.WORKER_TIMEOUT_S`` seconds without a batch and
raises the same way. :func:`benchmark_readers` measures this machine's reader throughput.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import get_worker_info

from scarce.config import TrainConfig
from scarce.data.augment import augment_patch
from scarce.data.empty import empty_crop
from scarce.data.inspect import sample_images
from scarce.data.monitor import measure_batches
from scarce.data.normalize import normalization_params, normalization_spec, normalize
from scarce.data.store import open_env, read_metadata, read_record
from scarce.data.workers import (
    TrainBatches,
    batch_generator,
    empty_tensor,
    resolve_reader_count,
)
from scarce.errors import InputError
from scarce.segment.scale import downscale_image, downscale_labels, resized_shape
from scarce.segment.targets import TargetSpec, border_weight_map, resolve_target

log = logging.getLogger(__name__)

_INDEX_CACHE_BYTES = 256 << 20  # per-worker budget for cached class-pixel indices
_SCALED_CACHE_BYTES = 512 << 20  # per-worker budget for downscaled samples (data.downscale)


def _inside_centre(size: int, patch: int, rng: np.random.Generator) -> int:
    """A uniform patch centre along one axis that keeps the patch inside the image.

    The patch covers ``[c - patch // 2, c - patch // 2 + patch)``. When the image is at least a
    patch long, the centre is uniform over the positions that keep the patch inside it (like
    MONAI's ``RandSpatialCrop``); when it is shorter, over the positions whose patch contains
    the whole image (reflection fills the rest). Only the augmentation's rotation, scale and
    jitter then reach beyond the border.
    """
    lo, hi = sorted((patch // 2, size - patch + patch // 2))
    return int(rng.integers(lo, hi + 1))


class _BatchMaker:
    """Builds batch ``b`` in whichever process owns it; opens LMDB lazily in that process."""

    def __init__(
        self, db_path: Path, cfg: TrainConfig, norm_spec: dict, rank: int, target: TargetSpec
    ):
        meta = read_metadata(db_path)  # opens and closes: nothing stays open across fork
        self.db_path, self.cfg, self.norm_spec, self.rank = db_path, cfg, norm_spec, rank
        self.target = target
        self.mask_kind = meta["mask_kind"]
        self.channels = int(meta["channels"])
        self.factor = float(cfg.data.downscale)
        self.empty_p = cfg.augment.empty_field_p if cfg.augment.enabled else 0.0
        self.shapes = [resized_shape(tuple(s["shape"]), self.factor) for s in meta["samples"]]
        self.weights = cfg.loss.border_weights and self.mask_kind == "instance"
        # targets cross the process boundary in the smallest dtype (fresh shared memory costs
        # page faults per byte); TrainBatches widens them to int64 in the consumer
        top = max([2, *meta.get("class_ids", [255]), target.ignore_label or 0])
        self.transfer_dtype = torch.uint8 if top <= 255 else torch.int64
        present: dict[int, list[int]] = {}
        for index, entry in enumerate(meta["samples"]):
            for c in entry["classes"]:
                if c != target.ignore_label:
                    present.setdefault(int(c), []).append(index)
        self.classes = sorted(present)
        self.samples_with = [np.asarray(present[c]) for c in self.classes]
        self._env, self._pid = None, None
        self._norm_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._index_cache: dict[tuple[int, int], np.ndarray] = {}
        self._index_bytes = 0
        self._scaled: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._scaled_bytes = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_env"] = None  # an LMDB environment must never cross a process boundary
        return state

    def _txn(self):
        if self._env is None or self._pid != os.getpid():
            self._env, self._pid = open_env(self.db_path), os.getpid()
        return self._env.begin(buffers=True)

    def close(self) -> None:
        if self._env is not None and self._pid == os.getpid():
            self._env.close()
        self._env = None

    def collate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Widen the target to int64 in the consumer (it crosses processes as uint8)."""
        batch["target"] = batch["target"].long()  # no copy when already int64
        return batch

    def _class_pixels(self, index: int, cls: int, mask: np.ndarray) -> np.ndarray:
        """Flat indices of the pixels of class ``cls`` in ``mask`` (cached within a budget)."""
        cached = self._index_cache.get((index, cls))
        if cached is not None:
            return cached
        if self.mask_kind == "instance":  # class 1 = any object, 0 = background
            hit = mask != 0 if cls == 1 else mask == 0
            if cls == 1 and self.target.ignore_label is not None:
                hit &= mask != self.target.ignore_label
        else:
            hit = mask == cls
        flat = np.flatnonzero(hit).astype(np.int32 if mask.size < 2**31 else np.int64)
        if self._index_bytes + flat.nbytes <= _INDEX_CACHE_BYTES:
            self._index_cache[(index, cls)] = flat
            self._index_bytes += flat.nbytes
        return flat

    def _params(self, index: int, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        params = self._norm_cache.get(index)
        if params is None:
            params = self._norm_cache[index] = normalization_params(image, self.norm_spec)
        return params

    def _arrays(self, index: int, txn) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(C, H, W)`` and mask ``(H, W)`` of sample ``index`` at the run's scale.

        Without ``data.downscale`` these are views on the LMDB buffer (valid inside ``txn``);
        with it, images shrunk by area and masks by nearest neighbour, cached in this worker
        within ``_SCALED_CACHE_BYTES``.
        """
        cached = self._scaled.get(index)
        if cached is not None:
            return cached
        sample = read_record(txn, index, self.db_path)
        if self.factor == 1:
            return sample.image, sample.mask
        self._params(index, sample.image)  # normalise with full-resolution statistics, as tests do
        arrays = (
            downscale_image(sample.image, self.factor),
            downscale_labels(sample.mask, self.factor),
        )
        size = arrays[0].nbytes + arrays[1].nbytes
        if self._scaled_bytes + size <= _SCALED_CACHE_BYTES:
            self._scaled[index] = arrays
            self._scaled_bytes += size
        return arrays

    def _draw(self, rng: np.random.Generator, txn) -> tuple[int, tuple[float, float], tuple]:
        """Choose a sample and a patch centre ``(y, x)`` in pixels; return its arrays."""
        if self.cfg.data.balance_classes and self.classes:
            k = int(rng.integers(len(self.classes)))
            index = int(self.samples_with[k][rng.integers(len(self.samples_with[k]))])
            image, mask = self._arrays(index, txn)
            pixels = self._class_pixels(index, self.classes[k], mask)
            if len(pixels) == 0:
                if self.factor != 1:  # the class vanished when the mask was shrunk
                    y, x = (_inside_centre(n, self.cfg.data.patch_size, rng) for n in mask.shape)
                    return index, (float(y), float(x)), (image, mask)
                raise ValueError(
                    f"{self.db_path}: sample {index} has no pixel of class "
                    f"{self.classes[k]} although the metadata lists it; re-ingest"
                )
            y, x = divmod(int(pixels[rng.integers(len(pixels))]), mask.shape[1])
        else:
            index = int(rng.integers(len(self.shapes)))
            image, mask = self._arrays(index, txn)
            y, x = (_inside_centre(n, self.cfg.data.patch_size, rng) for n in self.shapes[index])
        return index, (float(y), float(x)), (image, mask)

    def batch(self, b: int) -> dict[str, torch.Tensor]:
        """Batch ``b``: ``image`` (N, C, P, P) float32, ``target`` (N, P, P) int64, [``weight``]."""
        rng = batch_generator(self.cfg.seed, self.rank, b)
        n, p = self.cfg.data.batch_size, self.cfg.data.patch_size
        shared = get_worker_info() is not None  # results go through shared memory: allocate there
        out = {
            "image": empty_tensor((n, self.channels, p, p), torch.float32, shared),
            "target": empty_tensor(
                (n, p, p), self.transfer_dtype if shared else torch.int64, shared
            ),
        }
        if self.weights:
            out["weight"] = empty_tensor((n, p, p), torch.float32, shared)
        views = {key: value.numpy() for key, value in out.items()}
        with self._txn() as txn:
            for i in range(n):
                index, centre, (source, source_mask) = self._draw(rng, txn)
                offset, scale = self._params(index, source)
                if self.empty_p and rng.random() < self.empty_p:  # normalised on its own
                    if (crop := empty_crop(source, source_mask, centre, 2 * p, rng)) is not None:
                        source, source_mask, centre = crop
                        offset, scale = normalization_params(source, self.norm_spec)
                image, mask = augment_patch(
                    source,
                    source_mask,
                    centre,
                    p,  # or crop
                    self.cfg.augment,
                    rng,
                    offset=offset,
                    scale=scale,
                )
                views["image"][i] = image
                views["target"][i] = self.target.derive(mask)
                if self.weights:
                    views["weight"][i] = border_weight_map(
                        mask, self.cfg.loss.border_w0, self.cfg.loss.border_sigma
                    )
        return out


def make_train_loader(
    db_path: str | os.PathLike,
    cfg: TrainConfig,
    *,
    norm_spec: dict,
    rank: int = 0,
    start_batch: int = 0,
    target: TargetSpec | None = None,
) -> TrainBatches:
    """Start the readers of a training database and return their infinite batch stream.

    Sampling: with ``cfg.data.balance_classes`` false, a sample is chosen uniformly and the
    patch centre uniformly among the positions that keep the patch inside the image (or, for
    images smaller than the patch, that keep the whole image inside the patch). With it true, a class is chosen uniformly among the classes present
    in the database (foreground/background for instance masks; never ``ignore_label``), then
    a sample containing it, then a centre uniformly among that sample's pixels of the class.
    The augmentation's jitter then shifts the centre.

    Parameters
    ----------
    db_path : path-like
        LMDB directory of the training samples (e.g. ``DB/train.lmdb``).
    cfg : TrainConfig
        Uses ``seed``, ``data`` (patch_size, batch_size, reader_count (-1 = auto, see
        :func:`resolve_reader_count`), prefetch_batches,
        balance_classes, target, boundary_width, ignore_label), ``augment`` and ``loss``
        (border_weights, border_w0, border_sigma).
    norm_spec : dict
        From :func:`scarce.data.normalize.normalization_spec`; saved with the model.
    rank : int, optional
        DDP rank; mixed into every batch's seed so ranks draw different batches.
    start_batch : int, optional
        Index of the first batch (resume: the number of steps done), >= 0.
    target : TargetSpec, optional
        How masks become class maps; default :func:`~scarce.segment.targets.resolve_target`
        of the database with ``cfg.data``'s target, boundary width and ignore label.

    Returns
    -------
    TrainBatches
        Yields ``{"image": torch.float32 (N, C, P, P), "target": torch.int64 (N, P, P)}`` with
        ``N = cfg.data.batch_size``, ``P = cfg.data.patch_size``, plus ``"weight"``
        ``torch.float32 (N, P, P)`` when ``cfg.loss.border_weights`` and the masks are
        instances. Batch ``b`` depends only on ``(cfg.seed, rank, b)`` and the config.

    Raises
    ------
    scarce.data.store.StoreError
        If ``db_path`` is not a Scarce database.
    ValueError
        On a negative ``rank`` or ``start_batch``, a ``data.reader_count`` below -1, or an
        empty database.

    References
    ----------
    Isensee F. et al. "nnU-Net: a self-configuring method for deep learning-based biomedical
    image segmentation." Nat. Methods 18:203-211 (2021), doi:10.1038/s41592-020-01008-z
    (foreground oversampling by centring patches on class pixels; centres anywhere in the
    image). Class-balanced drawing replaces the NIST reader's record-level balancing
    (usnistgov/semantic-segmentation-unet).
    """
    if not isinstance(norm_spec, dict):
        raise ValueError(
            f"norm_spec must be the dict from normalization_spec(), got {type(norm_spec).__name__}"
        )
    for name, value in (("rank", rank), ("start_batch", start_batch)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    reader_count = resolve_reader_count(cfg.data.reader_count)
    if target is None:
        target = resolve_target(
            read_metadata(db_path),
            cfg.data.target,
            boundary_width=cfg.data.boundary_width,
            ignore_label=cfg.data.ignore_label,
        )
    maker = _BatchMaker(Path(db_path), cfg, norm_spec, rank, target)
    if not maker.shapes:
        raise InputError(f"{db_path} holds no samples; ingest images into it first")
    if cfg.loss.border_weights and not maker.weights:
        log.warning(
            "loss.border_weights needs instance masks; %s has %s masks, so batches "
            "carry no weights",
            db_path,
            maker.mask_kind,
        )
    return TrainBatches(maker, start_batch, reader_count, cfg.data.prefetch_batches)


def benchmark_readers(
    db_path: str | os.PathLike,
    cfg: TrainConfig,
    *,
    seconds: float = 20.0,
    reader_count: int | None = None,
    warmup_batches: int | None = None,
) -> dict:
    """Measure how fast the readers deliver augmented training batches on this machine.

    Parameters
    ----------
    db_path : path-like
        A training LMDB directory, or a database folder holding ``train.lmdb``.
    cfg : TrainConfig
        Patch size, batch size, augmentation and normalisation to measure.
    seconds : float
        Measuring time after the warm-up, seconds (> 0).
    reader_count : int, optional
        Worker processes (-1 = auto, see :func:`scarce.data.workers.resolve_reader_count`);
        default ``cfg.data.reader_count``.
    warmup_batches : int, optional
        Batches drawn (and not timed) first so workers are started and queues are full;
        default ``2 * max(reader_count, 1)``.

    Returns
    -------
    dict
        :func:`scarce.data.monitor.measure_batches`'s keys plus ``reader_count`` (resolved)
        and ``patch_size`` (pixels).

    Raises
    ------
    ValueError
        If ``seconds`` <= 0 or ``reader_count`` < -1.
    scarce.errors.StoreError
        If no database is found at ``db_path``.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    count = resolve_reader_count(cfg.data.reader_count if reader_count is None else reader_count)
    path = Path(db_path)
    if not (path / "data.mdb").is_file() and (path / "train.lmdb").is_dir():
        path = path / "train.lmdb"
    cfg = replace(cfg, data=replace(cfg.data, reader_count=count))
    warmup = 2 * max(count, 1) if warmup_batches is None else warmup_batches
    spec = normalization_spec_for(path, cfg)
    with make_train_loader(path, cfg, norm_spec=spec) as batches:
        result = measure_batches(
            batches, seconds=seconds, warmup_batches=warmup, batch_size=cfg.data.batch_size
        )
    return {**result, "reader_count": count, "patch_size": cfg.data.patch_size}


def normalization_spec_for(db_path: str | os.PathLike, cfg: TrainConfig) -> dict:
    """The run's normalisation spec from ``cfg.data`` and the training database.

    ``robust`` fixes its noise floor on up to 100 evenly spaced training images
    (:func:`scarce.data.normalize.normalization_spec`); ``dataset`` reads the metadata.

    Raises
    ------
    ValueError
        As :func:`scarce.data.normalize.normalization_spec`.
    """
    data = cfg.data
    images = sample_images(db_path) if data.normalization == "robust" else None
    return normalization_spec(
        data.normalization,
        data.percentiles,
        read_metadata(db_path),
        images=images,
        floor_fraction=data.floor_fraction,
    )


def iter_test_images(db_path: str | os.PathLike, norm_spec: dict, target: TargetSpec | None = None):
    """Every stored sample of a database, whole, in key order, without augmentation.

    Parameters
    ----------
    db_path : path-like
        LMDB directory (e.g. ``DB/test.lmdb``).
    norm_spec : dict
        The normalisation the model was trained with.
    target : TargetSpec, optional
        The run's target (rule, boundary width, ignore label: ignored pixels keep the ignore
        label in the class map, so metrics skip them). Default: resolved from the database
        with ``target="auto"`` and its own ignore label.

    Yields
    ------
    name : str
        The sample's name.
    image : ndarray, shape (C, H, W), float32
        Normalised image (a new array).
    target : ndarray, shape (H, W), int64
        Class map.

    Raises
    ------
    scarce.errors.StoreError
        If ``db_path`` is not a Scarce database.
    """
    env = open_env(db_path)
    try:
        meta = read_metadata(env)
        target = target or resolve_target(meta)
        for index in range(int(meta["num_samples"])):
            with env.begin(buffers=True) as txn:
                sample = read_record(txn, index, db_path)
                image = normalize(sample.image, norm_spec)
                if np.may_share_memory(image, sample.image):
                    image = image.copy()  # the view dies with the transaction
                labels = np.array(target.derive(sample.mask), dtype=np.int64, copy=True)
            yield sample.name, np.asarray(image, dtype=np.float32), labels
    finally:
        env.close()


__all__ = [
    "benchmark_readers",
    "iter_test_images",
    "make_train_loader",
    "normalization_spec_for",
]

"""Training and test readers: LMDB samples -> augmented, normalised batches.

Worker processes (a torch ``DataLoader`` over an ``IterableDataset``, forked from a clean
fork server) each open the LMDB environment read-only and build whole batches: pick a sample
(uniformly or class-balanced), pick a patch centre, cut and augment the patch straight from
the zero-copy LMDB views (:func:`scarce.augment.augment_patch`), normalise it with per-sample
parameters cached in the worker, and turn the mask into a class map
(:func:`scarce.targets.derive_target`).

Batch ``b`` is drawn from its own generator, ``SeedSequence(seed, spawn_key=(rank, b))``, so
its content depends only on the seed, the DDP rank, ``b`` and the config: never on the number
of workers or on timing, and training resumes the stream exactly from ``start_batch``.

The process machinery (fork server, DataLoader wiring, watchdog, :class:`TrainBatches`,
:class:`ReaderError`) lives in :mod:`scarce.workers`: a worker that dies raises
:class:`ReaderError` in the consumer within about 5 s; one that hangs is killed after
``WORKER_TIMEOUT_S`` seconds without a batch (the value here when :func:`make_train_loader`
is called) and raises the same way. :class:`StarvationMonitor`, :func:`benchmark_readers`
and :func:`format_benchmark` live in :mod:`scarce.monitor`. Both are re-exported here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import get_worker_info

from scarce.augment import augment_patch
from scarce.config import TrainConfig
from scarce.monitor import StarvationMonitor, benchmark_readers, format_benchmark
from scarce.normalize import normalization_params, normalize
from scarce.store import decode_sample, open_env, read_metadata, sample_key
from scarce.targets import border_weight_map, derive_target
from scarce.workers import WORKER_TIMEOUT_S, ReaderError, TrainBatches

log = logging.getLogger(__name__)

_INDEX_CACHE_BYTES = 256 << 20  # per-worker budget for cached class-pixel indices


def batch_generator(seed: int, rank: int, batch: int) -> np.random.Generator:
    """The generator that draws everything random in one training batch.

    Parameters
    ----------
    seed : int
        ``TrainConfig.seed``.
    rank : int
        DDP rank of the consuming process (0 without DDP).
    batch : int
        Index of the batch in the stream (= optimiser step), counted from 0.

    Returns
    -------
    numpy.random.Generator
        PCG64 generator seeded with ``SeedSequence(seed, spawn_key=(rank, batch))``.

    References
    ----------
    NumPy ``SeedSequence.spawn``: child ``i`` of ``SeedSequence(s)`` is
    ``SeedSequence(s, spawn_key=(i,))``; here the key ``(rank, batch)`` names one child per
    rank and batch, independent streams without a shared counter (NumPy NEP 19).
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(rank, batch)))


def resolve_reader_count(n: int) -> int:
    """The number of reader worker processes that ``data.reader_count = n`` asks for.

    Parameters
    ----------
    n : int
        Workers per device: ``>= 1`` as given, ``0`` = read in the training process, ``-1`` =
        auto: half the CPU cores this process may run on, at least 1 and at most 8.

    Returns
    -------
    int
        ``n`` when ``n >= 0``; else ``max(1, min(8, cores // 2))`` with ``cores`` from
        ``os.sched_getaffinity(0)`` (respects taskset and container CPU sets) where the
        platform has it, else ``os.cpu_count()`` (2 if unknown).

    Raises
    ------
    ValueError
        If ``n`` is not an integer or is below -1.

    References
    ----------
    PyTorch's ``DataLoader`` counts usable cores the same way (``os.sched_getaffinity``) when
    it warns about too many workers; the other half of the cores is left to the trainer.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < -1:
        raise ValueError(
            f"data.reader_count must be an integer >= -1 (-1 = auto, 0 = in the "
            f"trainer, k = k worker processes), got {n!r}"
        )
    if n >= 0:
        return int(n)
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 2
    return max(1, min(8, cores // 2))


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

    def __init__(self, db_path: Path, cfg: TrainConfig, norm_spec: dict, rank: int):
        meta = read_metadata(db_path)  # opens and closes: nothing stays open across fork
        self.db_path, self.cfg, self.norm_spec, self.rank = db_path, cfg, norm_spec, rank
        self.mask_kind = meta["mask_kind"]
        self.channels = int(meta["channels"])
        self.shapes = [tuple(s["shape"]) for s in meta["samples"]]
        self.weights = cfg.loss.border_weights and self.mask_kind == "instance"
        # targets cross the process boundary in the smallest dtype (fresh shared memory costs
        # page faults per byte); TrainBatches widens them to int64 in the consumer
        top = max([2, *meta.get("class_ids", [255]), cfg.data.ignore_label or 0])
        self.transfer_dtype = torch.uint8 if top <= 255 else torch.int64
        present: dict[int, list[int]] = {}
        for index, entry in enumerate(meta["samples"]):
            for c in entry["classes"]:
                if c != cfg.data.ignore_label:
                    present.setdefault(int(c), []).append(index)
        self.classes = sorted(present)
        self.samples_with = [np.asarray(present[c]) for c in self.classes]
        self._env, self._pid = None, None
        self._norm_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._index_cache: dict[tuple[int, int], np.ndarray] = {}
        self._index_bytes = 0

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

    def _class_pixels(self, index: int, cls: int, mask: np.ndarray) -> np.ndarray:
        """Flat indices of the pixels of class ``cls`` in ``mask`` (cached within a budget)."""
        cached = self._index_cache.get((index, cls))
        if cached is not None:
            return cached
        if self.mask_kind == "instance":  # class 1 = any object, 0 = background
            hit = mask != 0 if cls == 1 else mask == 0
            if cls == 1 and self.cfg.data.ignore_label is not None:
                hit &= mask != self.cfg.data.ignore_label
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

    def _draw(self, rng: np.random.Generator, txn) -> tuple[int, tuple[float, float], object]:
        """Choose a sample and a patch centre ``(y, x)`` in pixels; return the decoded sample."""
        if self.cfg.data.balance_classes and self.classes:
            k = int(rng.integers(len(self.classes)))
            index = int(self.samples_with[k][rng.integers(len(self.samples_with[k]))])
            sample = decode_sample(txn.get(sample_key(index)))
            pixels = self._class_pixels(index, self.classes[k], sample.mask)
            if len(pixels) == 0:
                raise ValueError(
                    f"{self.db_path}: sample {sample.name} has no pixel of class "
                    f"{self.classes[k]} although the metadata lists it; re-ingest"
                )
            y, x = divmod(int(pixels[rng.integers(len(pixels))]), sample.mask.shape[1])
        else:
            index = int(rng.integers(len(self.shapes)))
            sample = decode_sample(txn.get(sample_key(index)))
            y, x = (_inside_centre(n, self.cfg.data.patch_size, rng) for n in self.shapes[index])
        return index, (float(y), float(x)), sample

    def batch(self, b: int) -> dict[str, torch.Tensor]:
        """Batch ``b``: ``image`` (N, C, P, P) float32, ``target`` (N, P, P) int64, [``weight``]."""
        rng = batch_generator(self.cfg.seed, self.rank, b)
        data, n, p = self.cfg.data, self.cfg.data.batch_size, self.cfg.data.patch_size
        shared = get_worker_info() is not None  # results go through shared memory: allocate there
        out = {
            "image": _empty((n, self.channels, p, p), torch.float32, shared),
            "target": _empty((n, p, p), self.transfer_dtype if shared else torch.int64, shared),
        }
        if self.weights:
            out["weight"] = _empty((n, p, p), torch.float32, shared)
        views = {key: value.numpy() for key, value in out.items()}
        with self._txn() as txn:
            for i in range(n):
                index, centre, sample = self._draw(rng, txn)
                offset, scale = self._params(index, sample.image)
                image, mask = augment_patch(
                    sample.image,
                    sample.mask,
                    centre,
                    p,  # or crop
                    self.cfg.augment,
                    rng,
                    offset=offset,
                    scale=scale,
                )
                views["image"][i] = image
                views["target"][i] = derive_target(
                    mask,
                    self.mask_kind,
                    data.target,
                    data.boundary_width,
                    ignore_label=data.ignore_label,
                )
                if self.weights:
                    views["weight"][i] = border_weight_map(
                        mask, self.cfg.loss.border_w0, self.cfg.loss.border_sigma
                    )
        return out


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype)
    return tensor.share_memory_() if shared else tensor


def make_train_loader(
    db_path: str | os.PathLike,
    cfg: TrainConfig,
    *,
    norm_spec: dict,
    rank: int = 0,
    start_batch: int = 0,
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
        From :func:`scarce.normalize.normalization_spec`; saved with the model.
    rank : int, optional
        DDP rank; mixed into every batch's seed so ranks draw different batches.
    start_batch : int, optional
        Index of the first batch (resume: the number of steps done), >= 0.

    Returns
    -------
    TrainBatches
        Yields ``{"image": torch.float32 (N, C, P, P), "target": torch.int64 (N, P, P)}`` with
        ``N = cfg.data.batch_size``, ``P = cfg.data.patch_size``, plus ``"weight"``
        ``torch.float32 (N, P, P)`` when ``cfg.loss.border_weights`` and the masks are
        instances. Batch ``b`` depends only on ``(cfg.seed, rank, b)`` and the config.

    Raises
    ------
    scarce.store.StoreError
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
    maker = _BatchMaker(Path(db_path), cfg, norm_spec, rank)
    if not maker.shapes:
        raise ValueError(f"{db_path} holds no samples; ingest images into it first")
    if cfg.loss.border_weights and not maker.weights:
        log.warning(
            "loss.border_weights needs instance masks; %s has %s masks, so batches "
            "carry no weights",
            db_path,
            maker.mask_kind,
        )
    return TrainBatches(
        maker, start_batch, reader_count, cfg.data.prefetch_batches, timeout_s=WORKER_TIMEOUT_S
    )


def iter_test_images(
    db_path: str | os.PathLike,
    norm_spec: dict,
    *,
    target: str = "auto",
    boundary_width: int = 2,
    ignore_label: int | None = None,
):
    """Every stored sample of a database, whole, in key order, without augmentation.

    Parameters
    ----------
    db_path : path-like
        LMDB directory (e.g. ``DB/test.lmdb``).
    norm_spec : dict
        The normalisation the model was trained with.
    target : {"auto", "class", "semantic", "boundary"}
        How masks become class maps (:func:`scarce.targets.derive_target`).
    boundary_width : int
        Boundary thickness for ``target="boundary"``, pixels.
    ignore_label : int, optional
        Mask value of unlabelled pixels; kept as it is in the class map.

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
    scarce.store.StoreError
        If ``db_path`` is not a Scarce database.
    """
    env = open_env(db_path)
    try:
        meta = read_metadata(env)
        for index in range(int(meta["num_samples"])):
            with env.begin(buffers=True) as txn:
                sample = decode_sample(txn.get(sample_key(index)))
                image = normalize(sample.image, norm_spec)
                if np.may_share_memory(image, sample.image):
                    image = image.copy()  # the view dies with the transaction
                labels = derive_target(
                    sample.mask,
                    meta["mask_kind"],
                    target,
                    boundary_width,
                    ignore_label=ignore_label,
                )
                labels = np.array(labels, dtype=np.int64, copy=True)
            yield sample.name, np.asarray(image, dtype=np.float32), labels
    finally:
        env.close()


__all__ = [
    "ReaderError",
    "StarvationMonitor",
    "TrainBatches",
    "WORKER_TIMEOUT_S",
    "batch_generator",
    "benchmark_readers",
    "format_benchmark",
    "iter_test_images",
    "make_train_loader",
    "resolve_reader_count",
]

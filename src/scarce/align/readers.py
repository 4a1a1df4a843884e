"""Training pairs for the aligner: consecutive slices (source z+1 -> target z) as patches.

The reader workers of :mod:`scarce.data.workers` build whole batches, deterministically: batch
``b`` of rank ``r`` is drawn from ``SeedSequence(seed, spawn_key=(r, b))`` whatever the number
of workers. Each pair is cut from the whole slices at a common centre and goes through

- **non-invertible augmentation** (applied to the data, as if the sections were cut that way):
  the pair is rotated by a uniform angle and flipped together; each slice is then shifted by up
  to ``2**(levels-1)`` px, rotated by N(0, 0.003) rad and scaled by N(1, 0.005); with
  probability ``deform_p`` the source is also deformed smoothly (a coarse random grid, as the
  U-Net's elastic deformation); an edge band of either slice may be cut (missing data). One
  warp per slice (:func:`scarce.data.augment.augment_patch`); pixels read from outside the slice
  or equal to the stack's missing value are invalid;
- **invertible augmentation** (the network's input only; the loss compares the clean slices):
  contrast and noise cutouts, missing-data cutouts (excluded from the loss), a brightness
  gradient, a global contrast compression by U(1, 3) and Gaussian noise.

Slices are normalised per slice (zero mean, unit std over valid pixels, from the ingest
statistics), so the MSE and ``lambda_smooth`` mean the same on any stack.

References
----------
E. Mitchell et al., arXiv:1904.02643 (2019); seung-lab/SEAMLeSS ``training/aug.py``
(``jitter_stacks``, ``aug_input``, ``aug_brightness``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import get_worker_info

from scarce.align.config import AlignConfig
from scarce.config import AugmentConfig
from scarce.data.augment import AugmentParams, augment_patch, sampling_grid
from scarce.data.photometric import Cutout, apply_photometric
from scarce.data.store import open_env, read_metadata, read_record
from scarce.data.workers import TrainBatches, batch_generator, empty_tensor, resolve_reader_count
from scarce.errors import InputError, StoreError

_LINEAR = AugmentConfig(interpolation="linear")
KEYS = (
    "source",
    "target",
    "source_input",
    "target_input",
    "source_valid",
    "target_valid",
    "source_mask",  # defect classes (0 normal, 1 crack, 2 fold, 3 missing); 0 without masks
    "target_mask",
)


def stack_metadata(db_path) -> dict:
    """The metadata record of a stack database (``scarce ingest-stack``).

    Raises
    ------
    scarce.errors.StoreError
        If ``db_path`` is not a stack database.
    """
    meta = read_metadata(db_path)
    if meta.get("kind") != "stack":
        raise StoreError(
            f"{db_path}: not a stack database (made by `scarce ingest`?); make one with "
            "`scarce ingest-stack --stack STACK --out DB`"
        )
    return meta


def valid_mask(image: np.ndarray, missing_value) -> np.ndarray:
    """``(H, W)`` uint8: 1 where the slice holds data (not ``missing_value``)."""
    if missing_value is None:
        return np.ones(image.shape[-2:], np.uint8)
    return (image.reshape(image.shape[-2:]) != missing_value).astype(np.uint8)


class PairMaker:
    """Builds batch ``b`` of training pairs in whichever process owns it (a ``BatchMaker``)."""

    def __init__(self, db_path: Path, cfg: AlignConfig, rank: int):
        meta = stack_metadata(db_path)
        self.db_path, self.cfg, self.rank = db_path, cfg, rank
        self.pairs = [tuple(p) for p in meta["pairs"]]
        self.stats = [(s["mean"], s["std"]) for s in meta["slice_stats"]]
        self.shapes = [tuple(s["shape"]) for s in meta["samples"]]
        self.missing = meta.get("missing_value")
        self.has_masks = bool(meta.get("has_masks"))
        shift = cfg.augment.translation
        self.max_shift = 2 ** (cfg.model.levels - 1) if shift < 0 else shift
        self._env, self._pid = None, None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_env"] = None  # an LMDB environment must never cross a process boundary
        return state

    def _txn(self):
        if self._env is None or self._pid != os.getpid():
            self._env, self._pid = open_env(self.db_path), os.getpid()
        return self._env.begin(buffers=True)

    def collate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Nothing to do in the consumer: every array is already float32."""
        return batch

    def close(self) -> None:
        if self._env is not None and self._pid == os.getpid():
            self._env.close()
        self._env = None

    def batch(self, b: int) -> dict[str, torch.Tensor]:
        """Batch ``b``: every key of :data:`KEYS`, ``(N, 1, P, P)`` float32 (valid: 0/1, mask:
        defect class)."""
        rng = batch_generator(self.cfg.seed, self.rank, b)
        n, p = self.cfg.data.batch_size, self.cfg.data.patch_size
        shared = get_worker_info() is not None
        out = {k: empty_tensor((n, 1, p, p), torch.float32, shared) for k in KEYS}
        views = {k: v.numpy() for k, v in out.items()}
        with self._txn() as txn:
            for i in range(n):
                for key, value in self.pair(txn, rng).items():
                    views[key][i] = value
        return out

    def pair(self, txn, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One augmented pair: the :data:`KEYS` arrays, ``(1, P, P)`` float32 each."""
        cfg, aug = self.cfg, self.cfg.augment
        src, tgt = self.pairs[int(rng.integers(len(self.pairs)))]
        if self.cfg.data.both_directions and rng.random() < 0.5:
            src, tgt = tgt, src
        h, w = self.shapes[src]
        p = cfg.data.patch_size
        centre = tuple(float(rng.uniform(min(p / 2, n / 2), max(n - p / 2, n / 2))) for n in (h, w))
        common = {"angle": 0.0, "flip_x": False, "flip_y": False}
        if aug.enabled and aug.pair_rotation:
            common = {
                "angle": float(rng.uniform(0, 360)),
                "flip_x": bool(rng.random() < 0.5),
                "flip_y": bool(rng.random() < 0.5),
            }
        out = {}
        for role, index in (("source", src), ("target", tgt)):
            params = self._slice_params(common, rng, deform=role == "source")
            image, valid, mask = self._cut(txn, index, centre, params, rng)
            if aug.enabled and rng.random() < aug.edge_band_p:
                _edge_band(image, valid, rng)
            out[role], out[f"{role}_valid"], out[f"{role}_mask"] = image, valid, mask
        for role in ("source", "target"):
            net_input, input_valid = self._invertible(out[role], rng)
            out[f"{role}_input"] = net_input
            out[f"{role}_valid"] *= input_valid  # missing-data cutouts never count
        return out

    def _slice_params(self, common: dict, rng, deform: bool) -> AugmentParams:
        aug = self.cfg.augment
        if not aug.enabled:
            return AugmentParams()
        shift = tuple(float(v) for v in rng.integers(-self.max_shift, self.max_shift + 1, 2))
        angle = common["angle"] + math.degrees(rng.normal(0.0, aug.rotation_sigma))
        scale = tuple(float(v) for v in rng.normal(1.0, aug.scale_sigma, 2))
        elastic = None
        if deform and rng.random() < aug.deform_p:
            elastic = rng.normal(0.0, aug.deform_sigma, (4, 4, 2)).astype(np.float32)
        return AugmentParams(common["flip_x"], common["flip_y"], angle, shift, scale, elastic)

    def _cut(self, txn, index: int, centre, params, rng):
        """Warp one slice into a normalised patch, its validity (0 outside the slice) and its
        defect mask, each ``(1, P, P)`` float32.

        Validity and defect class travel through one nearest-neighbour warp as one code,
        ``valid * (1 + class)``.
        """
        sample = read_record(txn, index, self.db_path)
        mean, std = self.stats[index]
        p = self.cfg.data.patch_size
        code = valid_mask(sample.image, self.missing)
        if sample.mask is not None:
            code = code * (1 + sample.mask.astype(np.uint8))
        image, moved = augment_patch(
            sample.image, code, centre, p, _LINEAR, rng, offset=[mean], scale=[std], params=params
        )
        map_y, map_x = sampling_grid(params, p, centre)
        h, w = sample.image.shape[-2:]
        inside = (map_y >= 0) & (map_y <= h - 1) & (map_x >= 0) & (map_x <= w - 1)
        valid = ((moved > 0) & inside).astype(np.float32)[None]
        mask = np.where(moved > 0, moved.astype(np.float32) - 1, 0.0)[None] * valid
        image *= valid  # invalid pixels hold 0 (the normalised mean), never garbage
        return image, valid, mask

    def _invertible(self, image: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """The network's view of a clean patch, and where it still shows the data."""
        aug, p = self.cfg.augment, image.shape[-1]
        net = image.copy()
        valid = np.ones_like(image)
        if not aug.enabled:
            return net, valid
        if rng.random() < aug.gradient_p:  # a brightness ramp across the patch
            angle, strength = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 1.0)
            ramp = np.cos(angle) * np.arange(p)[:, None] + np.sin(angle) * np.arange(p)[None, :]
            net += (strength * (ramp - ramp.mean()) / p).astype(np.float32)
        compression = rng.uniform(1.0, aug.contrast_max)
        net /= np.float32(compression)
        cutouts = []
        for kind in ("contrast", "missing", "noise"):
            if rng.random() < aug.cutout_p:
                side = max(1, int(aug.cutout_max_fraction * p))
                hh, ww = (int(v) for v in rng.integers(1, side + 1, 2))
                y0, x0 = int(rng.integers(0, p - hh + 1)), int(rng.integers(0, p - ww + 1))
                value = float(rng.uniform(0.5, 2.0)) if kind == "contrast" else 0.0
                cutouts.append(Cutout(kind, y0, x0, hh, ww, 1.0 if kind == "noise" else value))
                if kind == "missing":
                    valid[:, y0 : y0 + hh, x0 : x0 + ww] = 0
        apply_photometric(net, AugmentParams(noise_sigma=None, cutouts=tuple(cutouts)), rng)
        net += rng.normal(0.0, aug.noise_sigma, net.shape).astype(np.float32)
        return net, valid


def _edge_band(image: np.ndarray, valid: np.ndarray, rng) -> None:
    """Cut a band of width up to P/5 along a random edge: missing data (0, invalid)."""
    p = image.shape[-1]
    width = int(rng.integers(1, max(2, p // 5)))
    side = int(rng.integers(4))
    region = [slice(None)] * 3
    region[1 + side // 2] = slice(0, width) if side % 2 == 0 else slice(p - width, p)
    image[tuple(region)] = 0.0
    valid[tuple(region)] = 0.0


def make_pair_loader(db_path, cfg: AlignConfig, *, rank: int = 0, start_batch: int = 0):
    """Start the readers of a stack database and return their infinite batch stream.

    Parameters
    ----------
    db_path : path-like
        ``DB/train.lmdb`` from ``scarce ingest-stack``.
    cfg : AlignConfig
        ``seed``, ``data`` (patch_size, batch_size, reader_count, prefetch_batches,
        both_directions), ``augment`` and ``model.levels``.
    rank, start_batch : int
        DDP rank and the index of the first batch (resume).

    Returns
    -------
    scarce.data.workers.TrainBatches
        Yields dicts of :data:`KEYS` -> ``(N, 1, P, P)`` float32 tensors; batch ``b`` depends
        only on ``(cfg.seed, rank, b)`` and the config.

    Raises
    ------
    scarce.errors.StoreError
        If ``db_path`` is not a stack database.
    scarce.errors.InputError
        If it holds no pair of consecutive slices.
    """
    maker = PairMaker(Path(db_path), cfg, rank)
    if not maker.pairs:
        raise InputError(f"{db_path} holds no pair of consecutive slices; ingest a longer stack")
    count = resolve_reader_count(cfg.data.reader_count)
    return TrainBatches(maker, start_batch, count, cfg.data.prefetch_batches)


__all__ = ["KEYS", "PairMaker", "make_pair_loader", "stack_metadata", "valid_mask"]

"""The peer recipe of the accuracy benchmark: a plain MONAI 2D segmentation training.

This is what a MONAI user writes from the tutorials, with no tuning for the data:

- model: ``monai.networks.nets.BasicUNet`` (2D, features ``(32, 32, 64, 128, 256, 32)``,
  instance norm, LeakyReLU), ``out_channels`` = number of classes;
- loss: ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)``; Adam, constant lr 1e-3;
- data: dictionary transforms ``NormalizeIntensityd`` (per-image z-score), ``SpatialPadd`` (only
  images smaller than the patch), ``RandSpatialCropd``, ``RandFlipd`` on both axes,
  ``RandRotate90d``, ``RandAffined`` (rotation in [-pi, pi], scale +-10 %, translation +-10 %
  of the patch, reflection padding, nearest for the label) and ``RandGaussianNoised``, in a
  ``monai.data.DataLoader`` with one worker process, patches drawn from images with
  replacement;
- prediction: ``monai.inferers.sliding_window_inference`` (ROI = the patch, overlap 0.25,
  Gaussian blending), argmax.

Instance masks are trained as foreground/background (``mask > 0``); the peer's objects are then
the connected components of the predicted foreground (the caller does that).

Run this file to train the peer for a few steps on ``../shared/data/nist_rpe`` as a smoke test::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/peer_monai.py --steps 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

NOISE_STD = 0.1  # Gaussian noise std on the z-scored image (MONAI's default)
AUG_P = 0.5  # probability of each random transform (the MONAI tutorials' usual value)


def _check_pairs(train_pairs: Sequence, num_classes: int) -> int:
    """Validate ``(image (C, H, W), label (H, W))`` pairs; return the channel count C."""
    if not train_pairs:
        raise ValueError("train_pairs is empty: pass a list of (image (C, H, W), label (H, W))")
    channels = None
    for i, (image, label) in enumerate(train_pairs):
        image, label = np.asarray(image), np.asarray(label)
        if image.ndim != 3 or label.shape != image.shape[1:]:
            raise ValueError(
                f"pair {i}: expected image (C, H, W) and label (H, W) of the same "
                f"H, W; got {image.shape} and {label.shape}"
            )
        if label.dtype.kind not in "biu" or label.min() < 0 or label.max() >= num_classes:
            raise ValueError(
                f"pair {i}: labels must be integers in 0..{num_classes - 1}, got "
                f"dtype {label.dtype}, range {label.min()}..{label.max()}; map "
                "instance masks to mask > 0 first"
            )
        if channels not in (None, image.shape[0]):
            raise ValueError(f"pair {i}: {image.shape[0]} channels, earlier images had {channels}")
        channels = image.shape[0]
    return channels


def monai_transforms(patch: int):
    """The peer's training transforms on ``{"image": (C, H, W), "label": (1, H, W)}`` dicts.

    Parameters
    ----------
    patch : int
        Side of the square training patch, pixels.

    Returns
    -------
    monai.transforms.Compose
        Yields ``image`` float32 ``(C, patch, patch)`` (z-scored) and ``label`` ``(1, patch,
        patch)``.

    References
    ----------
    MONAI Consortium, "MONAI: An open-source framework for deep learning in healthcare",
    arXiv:2211.02701 (2022), doi:10.48550/arXiv.2211.02701 (dictionary transforms).
    """
    from monai import transforms as T

    size = (patch, patch)
    return T.Compose(
        [
            T.NormalizeIntensityd(keys="image"),
            T.SpatialPadd(keys=("image", "label"), spatial_size=size, mode="reflect"),
            T.RandSpatialCropd(keys=("image", "label"), roi_size=size, random_size=False),
            T.RandFlipd(keys=("image", "label"), prob=AUG_P, spatial_axis=0),
            T.RandFlipd(keys=("image", "label"), prob=AUG_P, spatial_axis=1),
            T.RandRotate90d(keys=("image", "label"), prob=AUG_P, max_k=3),
            T.RandAffined(
                keys=("image", "label"),
                prob=AUG_P,
                rotate_range=np.pi,
                scale_range=(0.1, 0.1),
                translate_range=(0.1 * patch, 0.1 * patch),
                mode=("bilinear", "nearest"),
                padding_mode="reflection",
            ),
            T.RandGaussianNoised(keys="image", prob=AUG_P, std=NOISE_STD),
            T.EnsureTyped(keys=("image", "label"), track_meta=False),
        ]
    )


def train_monai(
    train_pairs: Sequence,
    steps: int,
    patch: int,
    batch: int,
    lr: float = 1e-3,
    seed: int = 0,
    *,
    num_classes: int = 2,
    threads: int | None = None,
):
    """Train the peer recipe for exactly ``steps`` Adam steps on CPU.

    Parameters
    ----------
    train_pairs : sequence of (ndarray (C, H, W), ndarray (H, W))
        Raw images (any numeric dtype) and integer class maps with values in
        ``0..num_classes - 1``.
    steps : int
        Optimiser steps.
    patch : int
        Side of the square training patch, pixels (a multiple of 16 for BasicUNet).
    batch : int
        Patches per step.
    lr : float
        Adam learning rate, constant.
    seed : int
        Seeds the model initialisation, the image sampler and the transforms: the same seed
        gives the same run.
    num_classes : int
        Output channels K (2: background and foreground).
    threads : int, optional
        torch intra-op threads of the training process; None keeps the current setting.

    Returns
    -------
    model : monai.networks.nets.BasicUNet
        In eval mode; maps ``(N, C, H, W)`` float32 to logits ``(N, K, H, W)``.

    Raises
    ------
    ValueError
        For empty or malformed pairs, labels outside ``0..K-1``, ``steps``, ``batch`` < 1
        or a ``patch`` that is not a multiple of 16.

    References
    ----------
    Milletari et al., "V-Net", 3DV 2016, doi:10.1109/3DV.2016.79 (Dice loss); Isensee et al.,
    "nnU-Net", Nat. Methods 18 (2021), doi:10.1038/s41592-020-01008-z (Dice + CE).
    """
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet

    if steps < 1 or batch < 1 or patch < 16 or patch % 16:
        raise ValueError(
            f"need steps >= 1, batch >= 1 and patch a multiple of 16; got "
            f"steps={steps}, batch={batch}, patch={patch}"
        )
    channels = _check_pairs(train_pairs, num_classes)
    if threads:
        torch.set_num_threads(threads)
    seeds = np.random.SeedSequence(seed).generate_state(3)
    data = [
        {"image": np.asarray(im, dtype=np.float32), "label": np.asarray(lb)[None].astype(np.int64)}
        for im, lb in train_pairs
    ]
    transform = monai_transforms(patch)
    transform.set_random_state(seed=int(seeds[0]))
    sampler = torch.utils.data.RandomSampler(
        data,
        replacement=True,
        num_samples=steps * batch,
        generator=torch.Generator().manual_seed(int(seeds[1])),
    )
    loader = DataLoader(
        Dataset(data, transform),
        batch_size=batch,
        sampler=sampler,
        num_workers=1,
        persistent_workers=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(int(seeds[2]))
        model = BasicUNet(spatial_dims=2, in_channels=channels, out_channels=num_classes)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for item in loader:
        logits = model(item["image"])  # (N, K, patch, patch)
        loss = loss_fn(logits, item["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def predict_monai(model, image, patch: int = 256, overlap: float = 0.25) -> np.ndarray:
    """Class map of one raw image: z-score, MONAI sliding window (Gaussian blend), argmax.

    Parameters
    ----------
    model : torch.nn.Module
        From :func:`train_monai` (eval mode), ``(N, C, H, W)`` -> ``(N, K, H, W)``.
    image : ndarray, shape (C, H, W)
        Raw image, any numeric dtype.
    patch : int
        Sliding-window ROI side, pixels (the training patch).
    overlap : float
        Fraction of the ROI shared by neighbouring windows.

    Returns
    -------
    ndarray, shape (H, W), uint8
        Argmax class per pixel.

    Raises
    ------
    ValueError
        If ``image`` is not 3-D.

    References
    ----------
    Isensee et al., "nnU-Net", Nat. Methods 18 (2021), doi:10.1038/s41592-020-01008-z
    (Gaussian-weighted sliding window).
    """
    from monai.inferers import sliding_window_inference
    from monai.transforms import NormalizeIntensity

    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {image.shape}")
    x = NormalizeIntensity()(torch.from_numpy(image.astype(np.float32)))
    x = torch.as_tensor(x).float()[None]  # (1, C, H, W)
    logits = sliding_window_inference(
        x,
        roi_size=(patch, patch),
        sw_batch_size=4,
        predictor=model,
        overlap=overlap,
        mode="gaussian",
    )
    return torch.as_tensor(logits)[0].argmax(0).numpy().astype(np.uint8)


def _smoke(argv: list[str] | None = None) -> int:
    """Train on nist_rpe (every 5th image by sorted name is test) and print test Dice."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from scarce.io import list_image_files, read_image, read_mask, stem_of
    from scarce.segment.evaluate import evaluate_arrays

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "nist_rpe",
    )
    args = parser.parse_args(argv)
    files = list_image_files(args.data / "images")
    pairs = [(stem_of(f), read_image(f), read_mask(args.data / "masks" / f.name)) for f in files]
    train = [(im, (m > 0).astype(np.uint8)) for i, (_, im, m) in enumerate(pairs) if i % 5 != 4]
    test = [p for i, p in enumerate(pairs) if i % 5 == 4]
    start = time.perf_counter()
    model = train_monai(train, args.steps, 256, 4, threads=2)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s")
    metrics, _ = evaluate_arrays(
        [(n, (m > 0).astype(np.uint8), predict_monai(model, im)) for n, im, m in test],
        num_classes=2,
    )
    print(f"test foreground Dice (pooled) {metrics['mean_dice']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_smoke())

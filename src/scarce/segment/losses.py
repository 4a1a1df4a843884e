"""Segmentation losses and class weights.

The losses take logits ``(N, K, H, W)`` and class maps ``(N, H, W)`` and skip an optional
ignore label; :func:`class_weights_from_counts` turns pixel counts into inverse-frequency
class weights. Class maps and per-pixel border weights come from masks in
:mod:`scarce.segment.targets`.

References
----------
.. [1] O. Ronneberger et al., "U-Net", MICCAI 2015. doi:10.1007/978-3-319-24574-4_28
.. [2] F. Isensee et al., "nnU-Net", Nature Methods 2021. doi:10.1038/s41592-020-01008-z
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scarce.config import CHOICES

__all__ = ["LOSSES", "SegmentationLoss", "class_weights_from_counts"]

LOSSES = CHOICES["loss.name"]


def class_weights_from_counts(
    pixel_counts: Mapping | Sequence[int] | np.ndarray, num_classes: int
) -> np.ndarray:
    """Inverse-frequency class weights whose pixel-weighted mean is 1.

    ``w_k = total / (P * n_k)`` for the P classes with ``n_k > 0`` pixels, where total is
    their pixel sum; so ``sum_k n_k w_k / total = 1`` and a loss keeps its scale. Classes
    with no pixels get weight 0 (never inf): they cannot occur in the targets they were
    counted on. For a ``boundary`` target, count the derived target pixels, not the
    metadata's instance-mask counts (those have no boundary class).

    Parameters
    ----------
    pixel_counts : mapping or sequence of int
        Pixels per class: ``{"0": n0, "1": n1, ...}`` (keys str or int, as in the metadata
        record's ``class_pixel_counts``) or a sequence indexed by class. Ids >= K (e.g. an
        ignore label of 255) are left out.
    num_classes : int
        K.

    Returns
    -------
    ndarray, shape (K,), float32
        Finite, non-negative weights.

    Raises
    ------
    ValueError
        If a key is not an integer, a count or id is negative, ``num_classes < 1``, or no
        class in ``0 .. K-1`` has any pixel.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    items = pixel_counts.items() if isinstance(pixel_counts, Mapping) else enumerate(pixel_counts)
    counts = np.zeros(num_classes, dtype=np.float64)
    for key, count in items:
        if not str(key).isdigit():
            raise ValueError(f"pixel_counts key {key!r} is not a non-negative integer class id")
        class_id = int(key)
        if count < 0:
            raise ValueError(f"pixel_counts must be non-negative; got {key!r}: {count!r}")
        if class_id < num_classes:
            counts[class_id] += count
    present = counts > 0
    if not present.any():
        raise ValueError(f"no pixels in classes 0..{num_classes - 1}; counts: {pixel_counts}")
    total = counts[present].sum()
    weights = np.zeros(num_classes, dtype=np.float64)
    weights[present] = total / (present.sum() * counts[present])
    return weights.astype(np.float32)


class SegmentationLoss(nn.Module):
    """Cross-entropy, soft Dice, or their sum, on logits, skipping an ignore label.

    Parameters
    ----------
    name : {"ce", "dice", "dice_ce"}, default "dice_ce"
        ``ce``: ``sum_x c[t(x)] w(x) CE(x) / #valid``, with class weights c (default 1),
        the per-pixel ``weight`` w (default 1) and the mean over non-ignored pixels. The
        divisor is the pixel count, not torch's sum of weights, so border weights raise
        the loss where they are large, as in the U-Net paper's energy.
        ``dice``: ``1 - mean_k Dice_k`` with ``Dice_k = (2 sum p_k g_k + s) /
        (sum p_k + sum g_k + s)``, summed over the whole batch (N, H, W) per class
        ("batch Dice"), softmax probabilities p, one-hot targets g, s = 1e-5; class and
        pixel weights do not apply. ``dice_ce``: the sum, each with weight 1 (nnU-Net).
    num_classes : int, default 2
        K (>= 2).
    class_weights : Tensor, shape (K,), optional
        Cross-entropy class weights (e.g. from :func:`class_weights_from_counts`).
    ignore_label : int, optional
        Target value whose pixels count in neither term; may be >= K (e.g. 255).
    dice_include_background : bool, default False
        Average Dice over all classes, or over classes 1..K-1 (nnU-Net's default; on
        nist_rpe the two did not differ beyond seed noise).
    smooth : float, default 1e-5
        s in the Dice ratio; keeps it defined for a class absent from batch and prediction.

    Notes
    -----
    The loss is computed in float32 with autocast switched off, so it is the same under
    bf16/fp16 autocast. ``forward`` checks that target ids are in ``0..K-1`` (or the ignore
    label); on a GPU this costs one synchronisation per call.

    References
    ----------
    .. [1] F. Isensee et al., "nnU-Net", Nature Methods 2021. doi:10.1038/s41592-020-01008-z
    .. [2] F. Milletari, N. Navab, S.-A. Ahmadi, "V-Net", 3DV 2016. doi:10.1109/3DV.2016.79
    """

    def __init__(
        self,
        name: str = "dice_ce",
        num_classes: int = 2,
        *,
        class_weights: torch.Tensor | None = None,
        ignore_label: int | None = None,
        dice_include_background: bool = False,
        smooth: float = 1e-5,
    ):
        super().__init__()
        if name not in LOSSES:
            raise ValueError(f"loss name {name!r} is not one of {list(LOSSES)}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
            if class_weights.numel() != num_classes or not torch.isfinite(class_weights).all():
                raise ValueError(
                    f"class_weights must be {num_classes} finite values; got "
                    f"{class_weights.tolist()}"
                )
        self.name, self.num_classes, self.ignore_label = name, num_classes, ignore_label
        self.dice_include_background, self.smooth = dice_include_background, smooth
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scalar float32 loss for logits ``(N, K, H, W)``, target ``(N, H, W)`` int64
        and an optional per-pixel ``weight`` ``(N, H, W)`` float32 (cross-entropy only).

        Raises
        ------
        ValueError
            On mismatched shapes, a non-integer target, or target ids outside ``0..K-1``
            that are not the ignore label.
        """
        self._check(logits, target, weight)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()  # (N, K, H, W)
            valid = None if self.ignore_label is None else target != self.ignore_label
            target = target.long() if valid is None else target.long().masked_fill(~valid, 0)
            if bool(((target < 0) | (target >= self.num_classes)).any()):
                raise ValueError(
                    f"target holds class ids outside 0..{self.num_classes - 1} "
                    f"(min {int(target.min())}, max {int(target.max())}); check "
                    f"num_classes and ignore_label={self.ignore_label}"
                )
            loss = logits.new_zeros(())
            if self.name in ("ce", "dice_ce"):
                loss = loss + self._cross_entropy(logits, target, valid, weight)
            if self.name in ("dice", "dice_ce"):
                loss = loss + self._dice(logits, target, valid)
        return loss

    def _check(self, logits, target, weight) -> None:
        k = self.num_classes
        if logits.ndim != 4 or logits.shape[1] != k:
            raise ValueError(f"logits must be (N, {k}, H, W); got {tuple(logits.shape)}")
        expected = (logits.shape[0], *logits.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(f"target must be (N, H, W) = {expected}; got {tuple(target.shape)}")
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f"target must hold integer class ids; got dtype {target.dtype}")
        if weight is not None and tuple(weight.shape) != expected:
            raise ValueError(f"weight must be (N, H, W) = {expected}; got {tuple(weight.shape)}")

    def _cross_entropy(self, logits, target, valid, weight) -> torch.Tensor:
        ce = F.cross_entropy(logits, target, weight=self.class_weights, reduction="none")
        if weight is not None:
            ce = ce * weight.float()  # (N, H, W)
        if valid is None:
            return ce.mean()
        return (ce * valid).sum() / valid.sum().clamp_min(1)

    def _dice(self, logits, target, valid) -> torch.Tensor:
        probs = torch.softmax(logits, dim=1)  # (N, K, H, W)
        onehot = torch.zeros_like(probs).scatter_(1, target.unsqueeze(1), 1.0)  # (N, K, H, W)
        if valid is not None:
            keep = valid.unsqueeze(1).to(probs.dtype)  # (N, 1, H, W)
            probs, onehot = probs * keep, onehot * keep
        overlap = (probs * onehot).sum(dim=(0, 2, 3))  # (K,)
        total = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))  # (K,)
        dice = (2.0 * overlap + self.smooth) / (total + self.smooth)  # (K,)
        if not self.dice_include_background:
            dice = dice[1:]
        return 1.0 - dice.mean()

"""Building blocks the segmentation networks share: normalisation, conv-norm-ReLU, input checks.

:class:`~scarce.models.unet.UNet` and :class:`~scarce.models.segnet.SegNet` are assembled from
these; a new network that uses them gets the same normalisation choices and the same clear
errors for inputs of the wrong shape.
"""

from __future__ import annotations

import torch
from torch import nn

from scarce.config import CHOICES
from scarce.errors import InputError

NORMS = CHOICES["model.norm"]
MAX_GROUPS = 8


def group_count(channels: int, max_groups: int = MAX_GROUPS) -> int:
    """Number of GroupNorm groups for ``channels``: the largest divisor <= ``max_groups``.

    With the default of 8, a 32-channel stage gets 8 groups of 4 channels and a 4-channel
    stage (tiny test widths) gets 4 groups of 1 channel (instance-norm-like); a 12-channel
    stage gets 6 groups. A divisor is needed because GroupNorm splits channels evenly.

    References
    ----------
    .. [1] Y. Wu, K. He, "Group Normalization", ECCV 2018. doi:10.1007/978-3-030-01261-8_1
       (the paper uses 32 groups; 8 keeps several channels per group at small widths).
    """
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def norm_layer(norm: str, channels: int) -> nn.Module:
    """Normalisation layer for ``(N, channels, H, W)`` activations.

    Parameters
    ----------
    norm : {"batch", "group", "instance", "none"}
        ``batch``: BatchNorm2d; ``group``: GroupNorm with :func:`group_count` groups;
        ``instance``: InstanceNorm2d with learned affine parameters and no running
        statistics; ``none``: identity.
    channels : int
        Number of channels.

    Raises
    ------
    ValueError
        If ``norm`` is not one of :data:`NORMS`.
    """
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "none":
        return nn.Identity()
    raise InputError(f"norm = {norm!r} is not one of {list(NORMS)}")


def conv_norm_relu(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """3x3 convolution (zero ``same`` padding), normalisation, ReLU.

    Maps ``(N, in_channels, H, W)`` to ``(N, out_channels, H, W)``. The convolution has no
    bias when a normalisation layer follows (the norm's shift makes it redundant).
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm == "none"),
        norm_layer(norm, out_channels),
        nn.ReLU(inplace=True),
    )


def double_conv(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """Two :func:`conv_norm_relu` blocks: ``(N, in, H, W) -> (N, out, H, W)``."""
    return nn.Sequential(
        conv_norm_relu(in_channels, out_channels, norm),
        conv_norm_relu(out_channels, out_channels, norm),
    )


def check_options(in_channels: int, num_classes: int, depth: int, width: int, norm: str) -> None:
    """Validate the constructor options shared by all models.

    Raises
    ------
    ValueError
        If a count is not a positive integer or ``norm`` is unknown; the message names the
        option, the value that arrived and what is expected.
    """
    for name, value in (
        ("in_channels", in_channels),
        ("num_classes", num_classes),
        ("depth", depth),
        ("width", width),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if norm not in NORMS:
        raise InputError(f"norm = {norm!r} is not one of {list(NORMS)}")


def skip_input_checks() -> bool:
    """True while tracing, compiling or exporting, when Python-side shape checks must not run."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


@torch.jit.unused
def check_input(x: torch.Tensor, in_channels: int, multiple: int, model: str) -> None:
    """Check that ``x`` is ``(N, in_channels, H, W)`` with H and W multiples of ``multiple``.

    Raises
    ------
    ValueError
        On a wrong number of axes or channels, or a side that is not a multiple of
        ``multiple``; the message names the input size and the nearest valid sizes below
        and above (pad the image, as the sliding-window predictor does, or crop it).
    """
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(
            f"{model} expects input (N, {in_channels}, H, W); got shape {tuple(x.shape)}"
        )
    height, width = int(x.shape[2]), int(x.shape[3])
    bad = [(name, s) for name, s in (("height", height), ("width", width)) if s % multiple]
    if bad:
        hints = []
        for name, s in bad:
            below, above = (s // multiple) * multiple, (s // multiple + 1) * multiple
            valid = f"{below} or {above}" if below > 0 else f"{above}"
            hints.append(f"{name} {s} -> nearest valid {valid}")
        raise ValueError(
            f"{model} input size {height}x{width} (HxW) is not a multiple of {multiple} "
            f"(2**depth); {'; '.join(hints)}. Pad or crop the image to a valid size."
        )

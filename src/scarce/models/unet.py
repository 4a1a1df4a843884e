"""U-Net (Ronneberger et al. 2015) with ``same`` padding, and the building blocks SegNet shares.

The network keeps the paper's shape (two 3x3 convolutions per level, 2x2 max-pooling, an
up-sampling step and a skip concatenation per decoder level, a 1x1 classifier) with the
changes most later work adopted: zero ``same`` padding, so the output has the input's size;
a normalisation layer after each convolution; a configurable depth and base width.

References
----------
.. [1] O. Ronneberger, P. Fischer, T. Brox, "U-Net: Convolutional Networks for Biomedical
   Image Segmentation", MICCAI 2015, LNCS 9351, pp. 234-241.
   doi:10.1007/978-3-319-24574-4_28
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache

import torch
from torch import nn

NORMS = ("batch", "group", "instance", "none")
UPSAMPLINGS = ("transpose", "bilinear")
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
    raise ValueError(f"norm = {norm!r} is not one of {list(NORMS)}")


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
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if norm not in NORMS:
        raise ValueError(f"norm = {norm!r} is not one of {list(NORMS)}")


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


class UpStage(nn.Module):
    """One decoder level: up-sample x2, concatenate the skip, two conv-norm-ReLU blocks.

    ``forward(x (N, 2c, h, w), skip (N, c, 2h, 2w)) -> (N, c, 2h, 2w)``. ``transpose``
    up-samples with a 2x2 stride-2 transposed convolution (the paper's "up-convolution");
    ``bilinear`` interpolates (align_corners=False), then a 1x1 convolution halves the
    channels.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str, upsampling: str):
        super().__init__()
        if upsampling == "transpose":
            self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        elif upsampling == "bilinear":
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, out_channels, 1),
            )
        else:
            raise ValueError(f"upsampling = {upsampling!r} is not one of {list(UPSAMPLINGS)}")
        self.conv = double_conv(2 * out_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (N, c, 2h, 2w)
        x = torch.cat([skip, x], dim=1)  # (N, 2c, 2h, 2w)
        return self.conv(x)  # (N, c, 2h, 2w)


class UNet(nn.Module):
    """U-Net for 2-D segmentation: ``(N, C, H, W)`` float32 -> logits ``(N, K, H, W)``.

    Level ``l`` (0 = full resolution) has ``width * 2**l`` channels (or ``widths[l]``); the
    bottleneck, at level ``depth``, has ``width * 2**depth`` (or ``widths[depth]``). H and W
    must be multiples of ``size_multiple = 2**depth``.

    Parameters
    ----------
    in_channels : int
        Image channels C.
    num_classes : int
        Output classes K (one logit map each).
    depth : int, default 4
        Number of 2x2 max-poolings (the paper uses 4).
    width : int, default 32
        Channels of the first level; 64 reproduces the paper.
    widths : sequence of int, optional
        Channels of every level, full resolution first, bottleneck last (``depth + 1``
        values); overrides ``width``. ``(32, 32, 64, 128, 256)`` is MONAI's BasicUNet
        ("features") and keeps a wide full-resolution stage at little cost, because the
        coarse levels, not the fine ones, hold most of the parameters.
    norm : {"batch", "group", "instance", "none"}, default "batch"
        Normalisation after every 3x3 convolution (see :func:`norm_layer`).
    dropout : float, default 0.0
        Dropout probability on the bottleneck features (the paper puts dropout at the end
        of the contracting path); 0 disables it.
    upsampling : {"transpose", "bilinear"}, default "transpose"
        Decoder up-sampling (see :class:`UpStage`).

    Attributes
    ----------
    size_multiple : int
        ``2**depth``, pixels.
    receptive_field : int
        Side of the input window, in pixels, that can influence one output pixel (analytic,
        see :func:`unet_receptive_field`).
    halo : int
        ``receptive_field // 2``: context, in pixels, each output pixel reads on each side.
    options : dict
        Constructor options, so ``build_model("unet", C, K, **options)`` rebuilds the model.

    Raises
    ------
    ValueError
        On an invalid option (see :func:`check_options`); in ``forward``, on an input whose
        shape does not fit (see :func:`check_input`).

    References
    ----------
    .. [1] O. Ronneberger, P. Fischer, T. Brox, "U-Net: Convolutional Networks for Biomedical
       Image Segmentation", MICCAI 2015. doi:10.1007/978-3-319-24574-4_28
    """

    name = "unet"

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        depth: int = 4,
        width: int = 32,
        widths: Sequence[int] | None = None,
        norm: str = "batch",
        dropout: float = 0.0,
        upsampling: str = "transpose",
    ):
        super().__init__()
        check_options(in_channels, num_classes, depth, width, norm)
        if widths is not None:
            widths = list(widths)
            if len(widths) != depth + 1 or any(
                isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in widths
            ):
                raise ValueError(
                    f"widths must be depth + 1 = {depth + 1} positive integers (full "
                    f"resolution first, bottleneck last); got {widths!r}"
                )
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if upsampling not in UPSAMPLINGS:
            raise ValueError(f"upsampling = {upsampling!r} is not one of {list(UPSAMPLINGS)}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.depth = depth
        self.options = dict(
            depth=depth,
            width=width,
            widths=widths,
            norm=norm,
            dropout=float(dropout),
            upsampling=upsampling,
        )
        self.size_multiple = 2**depth
        self.receptive_field = unet_receptive_field(depth, upsampling)
        self.halo = self.receptive_field // 2
        chans = widths or [width * 2**level for level in range(depth + 1)]
        self.encoder = nn.ModuleList(
            double_conv(in_channels if level == 0 else chans[level - 1], chans[level], norm)
            for level in range(depth)
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = double_conv(chans[depth - 1], chans[depth], norm)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.decoder = nn.ModuleList(
            UpStage(chans[level + 1], chans[level], norm, upsampling)
            for level in reversed(range(depth))
        )
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K, H, W)`` for images ``(N, C, H, W)``; D = depth, c_l = channels of level l."""
        if not torch.jit.is_scripting():
            if not skip_input_checks():
                check_input(x, self.in_channels, self.size_multiple, "UNet")
        skips: list[torch.Tensor] = []
        for block in self.encoder:
            x = block(x)  # (N, c_l, H/2**l, W/2**l) at level l; c_l = w*2**l or widths[l]
            skips.append(x)
            x = self.pool(x)  # (N, c_l, H/2**(l+1), W/2**(l+1))
        x = self.dropout(self.bottleneck(x))  # (N, c_D, H/2**D, W/2**D)
        for i, stage in enumerate(self.decoder):
            x = stage(x, skips[len(skips) - 1 - i])  # (N, c_l, H/2**l, W/2**l), l = D-1-i
        return self.head(x)  # (N, K, H, W)


def unet_receptive_field(depth: int, upsampling: str = "transpose") -> int:
    """Analytic receptive field of :class:`UNet`, in pixels (side of a square window).

    Exact for the architecture, independent of the weights: the 1-D window of input pixels
    that can reach each output position is propagated through the layer graph (see
    :func:`window_extent`; the network is separable in rows and columns, so the 2-D window
    is its square). The largest window over the ``2**depth`` output phases is returned:
    the window of a pixel depends on its position modulo ``2**depth``. Values: 44, 100, 204,
    412 for depth 2-5 with ``transpose``; 52, 116, 236, 476 with ``bilinear``. A rule of
    thumb (sum of ``(k - 1) * 2**level`` over the deepest path, ``13 * 2**depth - 8``)
    comes within 4 pixels but undercounts, because up-sampled positions of both parities
    see shifted windows and the next convolution takes their union.

    Parameters
    ----------
    depth : int
        Number of poolings D.
    upsampling : {"transpose", "bilinear"}
        Decoder up-sampling mode.

    Returns
    -------
    int
        Receptive field, pixels.

    References
    ----------
    .. [1] A. Araujo, W. Norris, J. Sim, "Computing Receptive Fields of Convolutional
       Neural Networks", Distill 2019. doi:10.23915/distill.00021
    """
    window: Window = window_identity
    skips = []
    for _ in range(depth):
        window = window_conv(window, 2)
        skips.append(window)
        window = window_pool(window)
    window = window_conv(window, 2)
    for level in reversed(range(depth)):
        window = window_upsample(window, upsampling)
        window = window_conv(window_union(skips[level], window), 2)
    return window_extent(window, 2**depth)


# 1-D receptive windows: a window maps a position on a feature map to the (first, last)
# input pixel that can reach it. Each layer type turns the window of its input into the
# window of its output; caching keeps the recursion linear in the number of layers.

Window = Callable[[int], tuple[int, int]]


def window_identity(x: int) -> tuple[int, int]:
    return (x, x)


def window_conv(window: Window, count: int = 1) -> Window:
    """Window after ``count`` 3x3 (stride 1, ``same``) convolutions."""
    for _ in range(count):
        window = (lambda w: cache(lambda x: (w(x - 1)[0], w(x + 1)[1])))(window)
    return window


def window_pool(window: Window) -> Window:
    """Window after a 2x2 stride-2 pooling: coarse pixel m reads fine pixels 2m and 2m+1."""
    return cache(lambda m: (window(2 * m)[0], window(2 * m + 1)[1]))


def window_upsample(window: Window, mode: str) -> Window:
    """Window after x2 up-sampling: ``transpose`` (2x2 stride 2), ``unpool`` or ``bilinear``.

    A 2x2 stride-2 transposed convolution and max-unpooling give fine pixel x the coarse
    pixel ``x // 2``; bilinear interpolation (align_corners=False) reads ``(x - 1) // 2``
    and ``(x + 1) // 2``.
    """
    if mode == "bilinear":
        return cache(lambda x: (window((x - 1) // 2)[0], window((x + 1) // 2)[1]))
    return cache(lambda x: window(x // 2))


def window_union(a: Window, b: Window) -> Window:
    """Window after concatenating two feature maps of the same size."""
    return cache(lambda x: (min(a(x)[0], b(x)[0]), max(a(x)[1], b(x)[1])))


def window_extent(window: Window, period: int) -> int:
    """Largest window size, pixels, over output positions ``0 .. period - 1``."""
    return max(window(x)[1] - window(x)[0] + 1 for x in range(period))

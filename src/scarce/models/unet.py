"""U-Net (Ronneberger et al. 2015) with ``same`` padding.

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

from collections.abc import Sequence

import torch
from torch import nn

from scarce.config import CHOICES
from scarce.errors import InputError
from scarce.models.blocks import (
    check_input,
    check_options,
    double_conv,
    skip_input_checks,
)
from scarce.models.receptive import (
    Window,
    window_conv,
    window_extent,
    window_identity,
    window_pool,
    window_union,
    window_upsample,
)

UPSAMPLINGS = CHOICES["model.upsampling"]


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
            raise InputError(f"upsampling = {upsampling!r} is not one of {list(UPSAMPLINGS)}")
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
                raise InputError(
                    f"widths must be depth + 1 = {depth + 1} positive integers (full "
                    f"resolution first, bottleneck last); got {widths!r}"
                )
        if not 0.0 <= float(dropout) < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {dropout!r}")
        if upsampling not in UPSAMPLINGS:
            raise InputError(f"upsampling = {upsampling!r} is not one of {list(UPSAMPLINGS)}")
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
        self.arguments = dict(in_channels=in_channels, num_classes=num_classes, **self.options)
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

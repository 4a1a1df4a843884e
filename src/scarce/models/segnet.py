"""SegNet (Badrinarayanan et al. 2017): VGG-style encoder, decoder that max-unpools.

The encoder is VGG-16's convolutional part: stages of 3x3 conv-norm-ReLU blocks (2 in the
first two stages, 3 in the deeper ones), each followed by a 2x2 max-pool that remembers
where every maximum was. The decoder mirrors it: each stage places its input back at those
positions (max-unpooling, zeros elsewhere) and densifies the sparse map with the same
number of convolutions. No skip features are stored, only the pooling indices, which is
what makes SegNet memory-light compared with U-Net.

References
----------
.. [1] V. Badrinarayanan, A. Kendall, R. Cipolla, "SegNet: A Deep Convolutional
   Encoder-Decoder Architecture for Image Segmentation", IEEE TPAMI 39(12):2481-2495,
   2017. doi:10.1109/TPAMI.2016.2644615
.. [2] K. Simonyan, A. Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
   Recognition", ICLR 2015. arXiv:1409.1556 (the VGG-16 encoder)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scarce.models.blocks import check_input, check_options, conv_norm_relu, skip_input_checks
from scarce.models.receptive import (
    Window,
    window_conv,
    window_extent,
    window_identity,
    window_pool,
    window_upsample,
)


def stage_convs(stage: int) -> int:
    """Convolutions in encoder (and decoder) stage ``stage``: 2 for stages 0-1, else 3 (VGG-16)."""
    return 2 if stage < 2 else 3


def stage_channels(width: int, stage: int) -> int:
    """Channels of stage ``stage``: ``width * 2**min(stage, 3)`` (64-128-256-512-512 for 64)."""
    return width * 2 ** min(stage, 3)


def segnet_receptive_field(depth: int) -> int:
    """Analytic receptive field of :class:`SegNet`, in pixels (side of a square window).

    Exact for the architecture, independent of the weights: the 1-D window of input pixels
    that can reach each output position is propagated through the layer graph (encoder
    convolutions, 2x2 pools that read two pixels per axis, unpooling that gives fine pixel
    x the coarse pixel ``x // 2``, decoder convolutions; see
    :func:`scarce.models.unet.window_extent`), and the largest window over the
    ``2**depth`` output phases is returned. Values: 28, 84, 196, 404 for depth 2-5. It is
    an upper bound for a trained network: through a max-pool the gradient reaches only the
    arg-max, so a measurement (:func:`scarce.models.measure_receptive_field`) finds less.

    Parameters
    ----------
    depth : int
        Number of encoder stages (max-poolings).

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
    for s in range(depth):
        window = window_pool(window_conv(window, stage_convs(s)))
    for s in reversed(range(depth)):
        window = window_conv(window_upsample(window, "unpool"), stage_convs(s))
    return window_extent(window, 2**depth)


class MaxUnpool2x2(nn.Module):
    """Inverse of a 2x2 stride-2 max-pool: put each value back where its maximum was.

    ``forward(x (N, C, h, w), indices (N, C, h, w) int64) -> (N, C, 2h, 2w)``, zeros at the
    positions that were not maxima; ``indices`` are the flat ``(2h * 2w)`` positions returned
    by ``torch.nn.functional.max_pool2d_with_indices``. The result equals
    ``torch.nn.MaxUnpool2d(2, stride=2)``, which in torch 2.13 can be neither scripted (an
    internal assert on its kernel size) nor traced (its output-size check fails on traced
    sizes); a ``scatter`` is both, and exports to ONNX as ScatterElements.
    """

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        out = torch.zeros(n, c, 4 * h * w, dtype=x.dtype, device=x.device)  # (N, C, 4hw)
        out = out.scatter(2, indices.flatten(2), x.flatten(2))
        return out.view(n, c, 2 * h, 2 * w)  # (N, C, 2h, 2w)


class SegNet(nn.Module):
    """SegNet for 2-D segmentation: ``(N, C, H, W)`` float32 -> logits ``(N, K, H, W)``.

    Stage ``s`` has ``stage_channels(width, s)`` channels and ``stage_convs(s)``
    convolutions. The last convolution of each decoder stage maps to the channels of the
    stage above it, as in the paper; a 1x1 convolution makes the K logits (the paper's
    Caffe model uses a 3x3 one; 1x1 leaves the receptive field to the body).
    H and W must be multiples of ``size_multiple = 2**depth``.

    Parameters
    ----------
    in_channels : int
        Image channels C.
    num_classes : int
        Output classes K.
    depth : int, default 5
        Number of encoder stages, each ending in a 2x2 max-pool (the paper uses 5).
    width : int, default 64
        Channels of the first stage; 64 reproduces VGG-16 / the paper.
    norm : {"batch", "group", "instance", "none"}, default "batch"
        Normalisation after every 3x3 convolution (the paper uses batch norm).

    Attributes
    ----------
    size_multiple : int
        ``2**depth``, pixels.
    receptive_field : int
        Analytic receptive field, pixels (see :func:`segnet_receptive_field`).
    halo : int
        ``receptive_field // 2``, pixels.
    options : dict
        Constructor options, so ``build_model("segnet", C, K, **options)`` rebuilds it.

    Raises
    ------
    ValueError
        On an invalid option; in ``forward``, on an input whose shape does not fit (the
        message names the nearest valid sizes).

    Notes
    -----
    There is no ``dropout`` or ``upsampling`` option: the basic SegNet has no dropout (that
    is Bayesian SegNet) and always up-samples by unpooling. :func:`scarce.models.build_model`
    passes a model only the options its constructor accepts.

    References
    ----------
    .. [1] V. Badrinarayanan, A. Kendall, R. Cipolla, "SegNet: A Deep Convolutional
       Encoder-Decoder Architecture for Image Segmentation", IEEE TPAMI 2017.
       doi:10.1109/TPAMI.2016.2644615
    """

    name = "segnet"

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        depth: int = 5,
        width: int = 64,
        norm: str = "batch",
    ):
        super().__init__()
        check_options(in_channels, num_classes, depth, width, norm)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.depth = depth
        self.options = dict(depth=depth, width=width, norm=norm)
        self.arguments = dict(in_channels=in_channels, num_classes=num_classes, **self.options)
        self.size_multiple = 2**depth
        self.receptive_field = segnet_receptive_field(depth)
        self.halo = self.receptive_field // 2
        chans = [stage_channels(width, s) for s in range(depth)]
        self.encoder = nn.ModuleList()
        for s in range(depth):
            cin = in_channels if s == 0 else chans[s - 1]
            layers = [
                conv_norm_relu(cin if i == 0 else chans[s], chans[s], norm)
                for i in range(stage_convs(s))
            ]
            self.encoder.append(nn.Sequential(*layers))
        self.unpool = MaxUnpool2x2()
        self.decoder = nn.ModuleList()
        for s in reversed(range(depth)):
            cout = chans[max(s - 1, 0)]
            n = stage_convs(s)
            layers = [
                conv_norm_relu(chans[s], chans[s] if i < n - 1 else cout, norm) for i in range(n)
            ]
            self.decoder.append(nn.Sequential(*layers))
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K, H, W)`` for images ``(N, C, H, W)``; c_s = stage channels."""
        if not torch.jit.is_scripting():
            if not skip_input_checks():
                check_input(x, self.in_channels, self.size_multiple, "SegNet")
        indices: list[torch.Tensor] = []
        for stage in self.encoder:
            x = stage(x)  # (N, c_s, H/2**s, W/2**s)
            x, idx = F.max_pool2d_with_indices(
                x, [2, 2], [2, 2]
            )  # (N, c_s, H/2**(s+1), W/2**(s+1))
            indices.append(idx)
        for i, stage in enumerate(self.decoder):
            x = self.unpool(x, indices[len(indices) - 1 - i])  # (N, c_s, H/2**s, W/2**s)
            x = stage(x)  # (N, c_(s-1), H/2**s, W/2**s), s = depth-1-i
        return self.head(x)  # (N, K, H, W)

"""SEAMLeSS-style field network: a Siamese encoder pyramid and one aligner per level.

The encoder is shared by source and target (Siamese): per level two 3x3 convolutions with
LeakyReLU, then 2x2 max-pooling to the next level. Per level an aligner (a stack of k x k
convolutions with LeakyReLU, ending in 2 channels) reads ``[warped source encoding, target
encoding]`` and predicts a residual field ``r`` in pixels of that level. Coarse to fine: the
field so far is upsampled (values doubled), the source encoding is warped with it, the
residual is predicted and **composed**, ``D = r + warp(D, r)`` (warp by ``D``, then by ``r``),
not summed. Each aligner's last convolution starts at zero, so an untrained network outputs the
identity field. Levels coarser than ``open_levels`` allows are skipped during staged training.

Input ``source``, ``target``: ``(N, C, H, W)`` float32, H and W multiples of
``2 ** (levels - 1)``. Output: a dict level -> field ``(N, 2, H / 2**l, W / 2**l)`` in pixels
of that level, for every computed level; :meth:`FieldNet.field` gives the finest one at the
input's resolution.

References
----------
E. Mitchell, S. Keselj, S. Popovych, D. Buniatyan, H. S. Seung, "Siamese Encoding and
Alignment by Multiscale Learning with Self-Supervision", arXiv:1904.02643 (2019); the
aligner layout 2C -> 32 -> 64 -> 32 -> 16 -> 2 and encoder widths 12 + 6 * level follow
seung-lab/SEAMLeSS ``training/pyramid.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from scarce.errors import InputError
from scarce.models.field import compose, upsample, warp
from scarce.models.matching import (
    correlation,
    expected_offset,
    fill_specks,
    gaussian_smooth,
    region_smooth,
    regions_of,
    robust_affine,
)

SLOPE = 0.1  # LeakyReLU negative slope


def _conv(in_channels: int, out_channels: int, kernel: int) -> nn.Conv2d:
    """A same-padded convolution with He initialisation for LeakyReLU (SEAMLeSS rescales
    PyTorch's default by sqrt 6 to the same end: activations keep their scale with depth)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    nn.init.kaiming_normal_(conv.weight, a=SLOPE, nonlinearity="leaky_relu")
    nn.init.zeros_(conv.bias)
    return conv


def _encoder_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        _conv(in_channels, out_channels, 3),
        nn.LeakyReLU(SLOPE),
        _conv(out_channels, out_channels, 3),
        nn.LeakyReLU(SLOPE),
    )


def _aligner(in_channels: int, widths: tuple[int, ...], kernel: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    chans = [in_channels, *widths]
    for a, b in zip(chans[:-1], chans[1:]):
        layers += [_conv(a, b, kernel), nn.LeakyReLU(SLOPE)]
    last = nn.Conv2d(chans[-1], 2, kernel, padding=kernel // 2)
    nn.init.zeros_(last.weight)  # identity field at the start of training
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class FieldNet(nn.Module):
    """Siamese encoder pyramid + per-level aligners predicting a displacement field.

    Parameters
    ----------
    in_channels : int
        Channels C of a slice (1 for EM).
    levels : int
        Pyramid levels L; level l works at 1/2**l of the input. The coarsest level sees
        displacements of a few pixels there, i.e. ``2 ** (L - 1)`` times more at full size.
    encoder_widths : sequence of int, optional
        Channels per level (L values); default SEAMLeSS's ``12 + 6 * l``.
    aligner_widths : sequence of int
        Hidden channels of every aligner (before the 2-channel output).
    kernel_size : int
        Aligner convolution size (odd), pixels.
    finest_level : int
        The finest level with an aligner: the field is predicted down to 1/2**finest_level
        of the input and upsampled from there (cheaper; fields are smooth).
    correlation_radius : int
        Each aligner also reads the cost volume of the warped source and the target
        encodings over offsets up to this many pixels of its level (0: none), and its
        residual starts from the cost volume's best match (soft-argmax), smoothed (weighted
        by how peaked each match is); see :mod:`scarce.models.matching`. Explicit matching
        makes large displacements far quicker to learn (PWC-Net).
    smoothing : float
        Standard deviation of that smoothing in full-resolution pixels (at least 1 pixel of
        each level).
    match_temperature : float
        Sharpness of the soft-argmax over cosine similarities (fixed, not learned).
    input_level : int
        The pyramid starts at 1/2**input_level of the input (average-pooled), so no
        convolution runs at the finer levels (faster; ``<= finest_level``).
    match_channels : int
        Encodings are projected to this many channels (1x1 convolution) before the cost
        volume (0: no projection); fewer channels make the cost volume cheaper.
    refine : bool
        Each level's CNN adds a learned correction to the matched field (SEAMLeSS's aligner).
        Without it (only with a cost volume) a level's residual is its smoothed match alone:
        on ISBI 2012 the learned corrections over-warped (they chase content that differs
        between sections, which the similarity loss rewards), see benchmarks/results/align.md.
    coarse_affine : bool
        The coarsest level's residual is the robust (IRLS) affine fit of its matches,
        nothing local: between real sections look-alike structures (cell profiles)
        make coarse local matches ambiguous, while the bulk motion (shift, rotation, scale,
        shear) is well determined by the whole field of view. Finer levels add the local part.
    finest_iterations : int
        The finest computed level matches this many times, each time against the source
        encoding warped by the field so far: smoothing a match flattens a curved field, and
        every further pass shrinks what is left (the warping iterations of variational
        optical flow: T. Brox, A. Bruhn, N. Papenberg, J. Weickert, "High accuracy optical
        flow estimation based on a theory for warping", ECCV 2004).

    Attributes
    ----------
    arguments : dict
        Constructor arguments (to rebuild from a checkpoint).
    size_multiple : int
        ``2 ** (levels - 1)``: H and W must be multiples.
    receptive_field : int
        Receptive field of the output field along the coarsest level's path, pixels
        (:func:`fieldnet_receptive_field`).
    halo : int
        Context a tile needs on each side for seamless tiled fields: ``receptive_field // 2``.
    open_levels : int
        How many levels, from the coarsest, take part (staged training); default all.

    Raises
    ------
    InputError
        For invalid sizes.
    """

    def __init__(
        self,
        in_channels: int = 1,
        *,
        levels: int = 5,
        encoder_widths: tuple[int, ...] | None = None,
        aligner_widths: tuple[int, ...] = (32, 64, 32, 16),
        kernel_size: int = 7,
        finest_level: int = 0,
        correlation_radius: int = 0,
        smoothing: float = 16.0,
        match_temperature: float = 20.0,
        input_level: int = 0,
        match_channels: int = 0,
        coarse_affine: bool = False,
        refine: bool = True,
        finest_iterations: int = 1,
    ):
        super().__init__()
        widths = tuple(encoder_widths or [12 + 6 * level for level in range(levels)])
        if levels < 1 or len(widths) != levels or not 0 <= input_level <= finest_level < levels:
            raise InputError(
                f"FieldNet needs levels >= 1, {levels} encoder widths and 0 <= input_level <= "
                f"finest_level < levels; got levels={levels}, encoder_widths={widths}, "
                f"input_level={input_level}, finest_level={finest_level}"
            )
        if finest_iterations < 1:
            raise InputError(f"finest_iterations must be >= 1, got {finest_iterations}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise InputError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.in_channels, self.levels, self.finest_level = in_channels, levels, finest_level
        self.arguments = dict(
            in_channels=in_channels,
            levels=levels,
            encoder_widths=list(widths),
            aligner_widths=list(aligner_widths),
            kernel_size=kernel_size,
            finest_level=finest_level,
            correlation_radius=correlation_radius,
            smoothing=smoothing,
            match_temperature=match_temperature,
            input_level=input_level,
            match_channels=match_channels,
            coarse_affine=coarse_affine,
            refine=refine,
            finest_iterations=finest_iterations,
        )
        self.finest_iterations = finest_iterations
        self.input_level, self.coarse_affine, self.refine = input_level, coarse_affine, refine
        self.radius, self.smoothing = correlation_radius, smoothing
        # a fixed sharpness: learned, it drifts down under the smoothness penalty until the
        # matched field is the mean offset (~0) and the aligner collapses to the identity
        self.register_buffer("temperature", torch.full((levels,), float(match_temperature)))
        self.size_multiple = 2 ** (levels - 1)
        self.encoder = nn.ModuleList(
            _encoder_stage(
                in_channels if level <= input_level else widths[level - 1], widths[level]
            )
            if level >= input_level
            else nn.Identity()
            for level in range(levels)
        )
        self.match = nn.ModuleList(  # 1x1 projections of the encodings for the cost volume
            _conv(widths[level], match_channels, 1) if match_channels else nn.Identity()
            for level in range(levels)
        )
        self.pool = nn.MaxPool2d(2)
        self.aligners = nn.ModuleList(
            nn.Identity()
            if correlation_radius and not refine
            else _aligner(
                2 * widths[level] + (2 * correlation_radius + 1) ** 2 * (correlation_radius > 0),
                tuple(aligner_widths),
                kernel_size,
            )
            for level in range(levels)
        )
        self.receptive_field = fieldnet_receptive_field(levels, kernel_size, len(aligner_widths))
        self.halo = self.receptive_field // 2
        self.open_levels = levels
        # channels-last weights: with the channels-last activations of forward(), oneDNN's
        # convolutions and poolings on a CPU take about half the time (same results)
        self.to(memory_format=torch.channels_last)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor | None]:
        """Encodings per level: ``(N, C_l, H / 2**l, W / 2**l)`` for l = 0 .. L-1 (``None``
        below ``input_level``, where the input is average-pooled instead)."""
        out: list[torch.Tensor | None] = [None] * self.input_level
        x = (
            torch.nn.functional.avg_pool2d(image, 2**self.input_level)
            if self.input_level
            else image
        )
        for level in range(self.input_level, self.levels):
            if level > self.input_level:
                x = self.pool(x)
            x = self.encoder[level](x)  # (N, C_l, H/2**l, W/2**l)
            out.append(x)
        return out

    def forward(
        self,
        source: torch.Tensor,
        target: torch.Tensor,
        source_valid: torch.Tensor | None = None,
        target_valid: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """Fields per computed level, coarse to fine (see the module docstring).

        ``source_valid``, ``target_valid`` ``(N, 1, H, W)`` (optional, together; any real
        dtype): 1 where a slice holds usable tissue, 0 on defects (cracks, folds) and missing
        data. A cell of a coarser level is usable if none of its pixels is a defect, specks
        of fewer than 16 unusable pixels ignored (:func:`~scarce.models.matching.fill_specks`:
        scattered pixels that equal the missing-data value are not a defect). Matches are
        weighted by the target cell's usability times that of the source cell it pulls from,
        and averaged only within the connected regions of usable cells
        (:func:`~scarce.models.matching.region_smooth`), so a crack's two sides move apart
        instead of being averaged together.

        Raises
        ------
        InputError
            For slices of different shapes or not ``(N, C, H, W)``, sizes that are not a
            multiple of :attr:`size_multiple`, only one usable-tissue map, maps not
            ``(N, 1, H, W)`` on the slices' device, or maps without a cost volume
            (``correlation_radius == 0``: nothing to weight).
        """
        if source.shape != target.shape or source.ndim != 4:
            raise InputError(
                f"source {tuple(source.shape)} and target {tuple(target.shape)} must both be "
                "(N, C, H, W) of the same shape"
            )
        h, w = source.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise InputError(
                f"FieldNet input {h}x{w} is not a multiple of {self.size_multiple} "
                "(2 ** (levels - 1)); pad or crop the slices"
            )
        if (source_valid is None) != (target_valid is None):
            raise InputError("give both source_valid and target_valid, or neither")
        masked = source_valid is not None
        if masked:
            for name, v in (("source_valid", source_valid), ("target_valid", target_valid)):
                if v.shape != (source.shape[0], 1, h, w) or v.device != source.device:
                    raise InputError(
                        f"{name} {tuple(v.shape)} on {v.device} must be "
                        f"{(source.shape[0], 1, h, w)} on {source.device}, like the slices"
                    )
            if not self.radius:
                raise InputError("usable-tissue maps need a cost volume (correlation_radius > 0)")
        # source and target in one batch, channels-last: the 2-core CPU inference of a
        # 512 x 512 pair takes 0.7 x the time (same numbers); see benchmarks/results/align.md
        both = torch.cat([source, target]).contiguous(memory_format=torch.channels_last)
        encodings = [e.chunk(2) if e is not None else (None, None) for e in self.encode(both)]
        enc_s, enc_t = [e[0] for e in encodings], [e[1] for e in encodings]
        top = self.levels - 1
        stop = max(self.finest_level, self.levels - self.open_levels)
        field = source.new_zeros(source.shape[0], 2, *enc_s[top].shape[-2:])
        fields: dict[int, torch.Tensor] = {}
        schedule = [*range(top, stop - 1, -1), *[stop] * (self.finest_iterations - 1)]
        cells = {}  # level -> usable cells (N, 1, h, w) of source and target: no defect in them
        if masked:
            full = (source_valid.float(), target_valid.float())
            # coarser levels ignore specks of a few unusable pixels; any larger defect
            # marks every cell it touches (min-pooling), so a crack always cuts a level
            coarse = [fill_specks(v, 16) for v in full]
            for level in set(schedule):
                f = 2**level
                cells[level] = tuple(
                    -torch.nn.functional.max_pool2d(-c, f) if f > 1 else v
                    for v, c in zip(full, coarse)
                )
        for i, level in enumerate(schedule):
            if i and level < schedule[i - 1]:
                field = upsample(field)  # (N, 2, H/2**l, W/2**l), values x 2
            moved = warp(enc_s[level], field)  # source encoding pulled onto the target grid
            parts = [moved, enc_t[level]]
            matched = 0.0
            if self.radius:
                match = self.match[level]
                cost = correlation(match(moved), match(enc_t[level]), self.radius)  # (N, k*k, h, w)
                parts.append(cost)
                weights = torch.softmax(self.temperature[level] * cost.float(), dim=1)
                matched = expected_offset(weights, self.radius)  # the soft-argmax
                confidence = weights.amax(1, keepdim=True)
                if masked:
                    vs, vt = cells[level]
                    usable = vt * warp(vs, field.detach())  # the source's pulled onto the target
                    confidence = confidence * usable
                if self.coarse_affine and level == top:
                    field = compose(robust_affine(matched, confidence), field)
                    fields[level] = field
                    continue
                sigma = max(1.0, self.smoothing / 2**level)
                if masked:
                    regions = regions_of(usable, min_size=int(sigma**2))
                    matched = region_smooth(matched, confidence, sigma, regions)
                else:
                    matched = gaussian_smooth(matched, confidence, sigma)
            residual = matched
            if self.refine or not self.radius:
                residual = residual + self.aligners[level](torch.cat(parts, dim=1)).float()
            field = compose(residual, field)  # warp by field, then by residual
            fields[level] = field
        return fields

    def field(
        self,
        source: torch.Tensor,
        target: torch.Tensor,
        source_valid: torch.Tensor | None = None,
        target_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The finest field at the input's resolution: ``(N, 2, H, W)`` pixels (usable-pixel
        maps as in :meth:`forward`)."""
        fields = self.forward(source, target, source_valid, target_valid)
        level = min(fields)
        return upsample(fields[level], 2**level) if level else fields[level]


def fieldnet_receptive_field(levels: int, kernel_size: int, hidden_layers: int) -> int:
    """Receptive field of :class:`FieldNet` along its coarsest path, full-resolution pixels.

    The encoder's two 3x3 convolutions per level add ``4 * 2**l`` at level l and each 2x2
    pooling ``2**l``; the coarsest aligner's ``hidden_layers + 1`` k x k convolutions add
    ``(k - 1) * (hidden_layers + 1) * 2**(L - 1)``. Finer levels see less and only refine,
    so this is the extent of input that can move an output vector.
    """
    top = levels - 1
    encoder = sum(4 * 2**level for level in range(levels)) + (2**top - 1)
    aligner = (kernel_size - 1) * (hidden_layers + 1) * 2**top
    return encoder + aligner + 1


__all__ = ["FieldNet", "fieldnet_receptive_field"]

"""Segmentation networks: a plain-dict registry, a builder, and receptive-field measurement.

Every model maps images ``(N, C, H, W)`` float32 to logits ``(N, K, H, W)`` and exposes
``in_channels``, ``num_classes``, ``size_multiple`` (H and W must be multiples of it),
``receptive_field`` and ``halo`` (pixels, analytic) and ``options`` (its constructor
options, so a checkpoint can rebuild it with :func:`build_model`). C and K come from the
database metadata.
"""

from __future__ import annotations

import copy
import inspect
import logging

import numpy as np
import torch
from torch import nn

from scarce.models.segnet import SegNet, segnet_receptive_field
from scarce.models.unet import UNet, unet_receptive_field

log = logging.getLogger(__name__)

MODELS: dict[str, type] = {"unet": UNet, "segnet": SegNet}


def model_options(name: str) -> dict:
    """Keyword options of model ``name`` and their defaults, read from its constructor.

    Raises
    ------
    ValueError
        If ``name`` is not a key of :data:`MODELS` (the message lists the valid names).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid model names are {sorted(MODELS)}")
    params = inspect.signature(MODELS[name].__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_model(name: str, in_channels: int, num_classes: int, **options) -> nn.Module:
    """Build the registered model ``name`` for ``in_channels`` inputs and ``num_classes`` outputs.

    The trainer passes the same options for every model (``depth``, ``width``, ``norm``,
    ``dropout``, ``upsampling``). A model receives only the options its constructor accepts
    (read with :func:`inspect.signature`): an option that another registered model accepts
    is dropped, with a warning when its value differs from that model's default (e.g.
    ``dropout=0.2`` for SegNet), and an option no model accepts is an error.

    Parameters
    ----------
    name : str
        Key of :data:`MODELS` (``"unet"`` or ``"segnet"``).
    in_channels : int
        Image channels C.
    num_classes : int
        Output classes K.
    **options
        Constructor options (see :class:`UNet` and :class:`SegNet`).

    Returns
    -------
    torch.nn.Module
        The model, in training mode, on the CPU, in float32.

    Raises
    ------
    ValueError
        For an unknown model name (the message lists the valid names), an unknown option
        (the message lists the model's valid options), or an invalid option value.
    """
    accepted = model_options(name)
    known = {key: model_options(other) for other in MODELS for key in model_options(other)}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for model {name!r}; valid options are {sorted(accepted)}"
        )
    for key in sorted(set(options) - set(accepted)):
        default = known[key][key]
        if options[key] != default:
            log.warning("model %r has no option %r: value %r ignored", name, key, options[key])
    kwargs = {key: value for key, value in options.items() if key in accepted}
    return MODELS[name](in_channels, num_classes, **kwargs)


def _drop_input_statistics(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with GroupNorm/InstanceNorm replaced by identities."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.GroupNorm | nn.InstanceNorm2d):
                setattr(parent, child_name, nn.Identity())
    return model


def measure_receptive_field(
    model: nn.Module,
    in_channels: int,
    size: int | None = None,
    *,
    rng: np.random.Generator | None = None,
    all_phases: bool = False,
) -> int:
    """Receptive field measured by gradients: the input extent that reaches one output pixel.

    The summed class logits of the centre output pixel are differentiated with respect to a
    random input ``(1, C, size, size)``, uniform in [0, 1); the receptive field is the
    larger of the height and width of the bounding box of the input pixels with a non-zero
    gradient. The model is put in eval mode (dropout off, batch-norm running statistics)
    on a copy in which group and instance normalisation become identities: they normalise
    with statistics of the whole input, which would make every output pixel depend
    (weakly) on every input pixel and hide the convolutional context the halo stands for.
    The model passed in is not modified.

    Parameters
    ----------
    model : torch.nn.Module
        Network mapping ``(N, C, H, W)`` to ``(N, K, H, W)``.
    in_channels : int
        Input channels C.
    size : int, optional
        Input side, pixels. Default: the smallest multiple of ``model.size_multiple`` that
        is at least ``model.receptive_field + 2 * model.size_multiple``, so the window fits.
    rng : numpy.random.Generator, optional
        Source of the random input; default ``numpy.random.default_rng(0)``.
    all_phases : bool, default False
        Also measure the pixels ``centre + (d, d)`` for ``d < size_multiple`` and return the
        largest value: the window depends on the pixel's position modulo ``size_multiple``.

    Returns
    -------
    int
        Measured receptive field, pixels. It is at most the analytic one: max-pooling
        passes gradients to the arg-max only, and ReLUs cut paths.

    Raises
    ------
    ValueError
        If ``size`` is None and ``model`` has no ``receptive_field`` attribute, or ``size``
        is not a positive integer.

    References
    ----------
    .. [1] NIST semantic-segmentation-unet (usnistgov, GitHub), which derives its tile halo
       from the gradient of an output pixel with respect to the input.
    .. [2] W. Luo, Y. Li, R. Urtasun, R. Zemel, "Understanding the Effective Receptive Field
       in Deep Convolutional Neural Networks", NeurIPS 2016. arXiv:1701.04128
    """
    multiple = int(getattr(model, "size_multiple", 1))
    if size is None:
        if not hasattr(model, "receptive_field"):
            raise ValueError("model has no receptive_field attribute; pass size= explicitly")
        needed = int(model.receptive_field) + 2 * multiple
        size = -(-needed // multiple) * multiple
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer (pixels), got {size!r}")
    rng = np.random.default_rng(0) if rng is None else rng
    probe = _drop_input_statistics(model).eval()
    first = next(probe.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    image = rng.random((1, in_channels, size, size), dtype=np.float32)
    x = torch.from_numpy(image).to(device).requires_grad_(True)
    out = probe(x)
    offsets = range(multiple) if all_phases else range(1)
    best = 0
    for d in offsets:
        r = min(size // 2 + d, size - 1)
        (grad,) = torch.autograd.grad(out[0, :, r, r].sum(), x, retain_graph=True)
        hit = grad.abs().sum(dim=(0, 1)) > 0  # (size, size)
        rows = torch.nonzero(hit.any(dim=1)).flatten()
        cols = torch.nonzero(hit.any(dim=0)).flatten()
        if rows.numel():
            extent = max(int(rows[-1] - rows[0]) + 1, int(cols[-1] - cols[0]) + 1)
            best = max(best, extent)
    return best


__all__ = [
    "MODELS",
    "SegNet",
    "UNet",
    "build_model",
    "measure_receptive_field",
    "model_options",
    "segnet_receptive_field",
    "unet_receptive_field",
]

"""The networks Scarce trains: a plain-dict registry (name -> class) and a builder.

Every registered model exposes ``arguments`` (its constructor arguments as plain values, so a
checkpoint can rebuild it with ``build_model(name, **arguments)``), ``size_multiple`` (H and
W must be multiples of it), ``receptive_field`` and ``halo`` (pixels, analytic).
Segmentation networks map images ``(N, C, H, W)`` float32 to logits ``(N, K, H, W)`` and
also expose ``in_channels``, ``num_classes`` and ``options`` (their keyword options); C and K
come from the database metadata. Shared layers live in :mod:`scarce.models.blocks`,
receptive-field arithmetic and measurement in :mod:`scarce.models.receptive`.
"""

from __future__ import annotations

import inspect
import logging

from torch import nn

from scarce.errors import InputError
from scarce.models.fieldnet import FieldNet
from scarce.models.segnet import SegNet
from scarce.models.unet import UNet

log = logging.getLogger(__name__)

MODELS: dict[str, type] = {"unet": UNet, "segnet": SegNet, "fieldnet": FieldNet}


def model_options(name: str) -> dict:
    """Keyword options of model ``name`` and their defaults, read from its constructor.

    Raises
    ------
    ValueError
        If ``name`` is not a key of :data:`MODELS` (the message lists the valid names).
    """
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; valid model names are {sorted(MODELS)}")
    params = inspect.signature(MODELS[name].__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_model(name: str, /, *args, **options) -> nn.Module:
    """Build the registered model ``name``, e.g. ``build_model("unet", 1, 2, width=16)``.

    Positional arguments, and keyword arguments that name positional parameters of the model
    (``in_channels``, ``num_classes``), go to the constructor as they are; so does
    ``build_model(name, **model.arguments)``. The segmentation task passes the same options for every model (``depth``, ``width``, ``norm``,
    ``dropout``, ``upsampling``). A model receives only the options its constructor accepts
    (read with :func:`inspect.signature`): an option that another registered model accepts
    is dropped, with a warning when its value differs from that model's default (e.g.
    ``dropout=0.2`` for SegNet), and an option no model accepts is an error.

    Parameters
    ----------
    name : str
        Key of :data:`MODELS` (``"unet"`` or ``"segnet"``).
    *args
        Positional constructor arguments; for segmentation networks ``in_channels`` (image
        channels C) and ``num_classes`` (output classes K).
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
    params = inspect.signature(MODELS[name].__init__).parameters.values()
    positional = {p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD}
    args_by_name = {k: options.pop(k) for k in list(options) if k in positional}
    known = {key: model_options(other) for other in MODELS for key in model_options(other)}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InputError(
            f"unknown option(s) {unknown} for model {name!r}; valid options are {sorted(accepted)}"
        )
    for key in sorted(set(options) - set(accepted)):
        default = known[key][key]
        if options[key] != default:
            log.warning("model %r has no option %r: value %r ignored", name, key, options[key])
    kwargs = {key: value for key, value in options.items() if key in accepted}
    return MODELS[name](*args, **args_by_name, **kwargs)


__all__ = ["MODELS", "build_model", "model_options"]

"""Export of segmentation models: the metadata that says how to feed and read them.

:func:`export_model` is :func:`scarce.engine.export.export_network` with segmentation's
:func:`export_metadata` (normalisation, classes, target rule, tensor layouts); the bioimage.io
packages (:mod:`scarce.segment.bioimageio`) use the same metadata.
"""

from __future__ import annotations

from pathlib import Path

from scarce.engine.export import export_network
from scarce.segment.task import target_of

__all__ = ["INPUT_LAYOUT", "OUTPUT_LAYOUT", "export_metadata", "export_model"]

INPUT_LAYOUT = "(N, C, H, W) float32 normalised; H, W multiples of size_multiple"
OUTPUT_LAYOUT = "(N, K, H, W) float32 logits (softmax over K gives class probabilities)"


def export_metadata(model, ckpt: dict) -> dict:
    """Segmentation's part of an exported model's metadata: how to feed it, how to read it.

    Parameters
    ----------
    model : torch.nn.Module
        The rebuilt network.
    ckpt : dict
        Its checkpoint.

    Returns
    -------
    dict
        ``in_channels``, ``num_classes``, ``normalization`` (apply it before the network:
        :func:`scarce.data.normalize.normalize`), ``class_names``, ``target`` (rule),
        ``mask_kind``, ``ignore_label``, ``scale`` (the ``downscale`` factor and pixel size
        the network sees, see :mod:`scarce.segment.scale`), ``input`` and ``output`` (layouts).
    """
    target = target_of(ckpt)
    return {
        "in_channels": int(model.in_channels),
        "num_classes": int(model.num_classes),
        "normalization": ckpt["extras"]["normalization"],
        "class_names": list(target.class_names),
        "target": target.rule,
        "mask_kind": target.mask_kind,
        "ignore_label": target.ignore_label,
        "scale": ckpt["extras"].get("scale"),  # shrink inputs by scale["downscale"] first
        "input": INPUT_LAYOUT,
        "output": OUTPUT_LAYOUT,
    }


def export_model(model_path, fmt: str, out) -> Path:
    """Export a segmentation checkpoint to TorchScript or ONNX with its metadata (``scarce export``).

    :func:`scarce.engine.export.export_network` with :func:`export_metadata`: the file and
    ``<out>.json`` say how to normalise inputs and read the logits.

    Parameters
    ----------
    model_path : path-like
        Checkpoint file or run folder.
    fmt : {"torchscript", "onnx"}
    out : path-like
        Model file to write.

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    scarce.errors.InputError
        For an unknown ``fmt`` or an output folder that cannot be created.
    scarce.errors.CheckpointError
        For a missing, invalid or non-segmentation checkpoint.
    """
    return export_network(model_path, fmt, out, describe=export_metadata)

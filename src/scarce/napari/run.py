"""What the widget runs, without Qt: a model on one image, as napari layer-data tuples.

:func:`predict_layers` takes a Scarce checkpoint or run folder (normalisation, sliding window
and instances as ``scarce predict``) or a bioimage.io package (``.zip`` or ``rdf.yaml``, run by
``bioimageio.core`` with its own pre- and postprocessing) and returns ``(data, kwargs,
"labels")`` tuples that napari adds as layers.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from scarce.errors import InputError, MissingInputError
from scarce.io import MAX_CHANNELS


def as_chw(data, rgb: bool = False) -> np.ndarray:
    """An image layer's data as ``(C, H, W)``: ``(H, W)``, RGB ``(H, W, 3|4)`` or ``(C, H, W)``.

    Raises
    ------
    scarce.errors.InputError
        For other shapes (e.g. a 3D stack: choose one plane first).
    """
    array = np.asarray(data)
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3 and rgb:
        return np.moveaxis(array, -1, 0)
    if array.ndim == 3 and array.shape[0] <= MAX_CHANNELS:
        return array
    raise InputError(
        f"image layer has shape {array.shape}; the widget segments 2D images (H, W), RGB or "
        f"(C, H, W) with up to {MAX_CHANNELS} channels"
    )


@lru_cache(maxsize=2)
def _scarce_model(path: str):
    from scarce.engine.checkpoint import load_model

    return load_model(path, "cpu")


def _scarce_probabilities(path: Path, image: np.ndarray, tile_size: int | None):
    from scarce.segment.predict import instance_options, predict_image
    from scarce.segment.task import target_of

    model, ckpt = _scarce_model(str(path))
    probs = predict_image(model, image, ckpt, tile_size=tile_size or None).numpy()
    target = target_of(ckpt)
    return probs, target.rule, list(target.class_names), instance_options(ckpt)


def _bioimageio_probabilities(path: Path, image: np.ndarray):
    """Probabilities ``(K, H, W)`` from a bioimage.io package (tiled by bioimageio.core)."""
    try:
        from bioimageio.core import Tensor, load_description, predict
    except ImportError as exc:
        raise InputError(
            f"bioimage.io packages need bioimageio.core ({exc}): pip install 'scarce[bioimageio]'"
        ) from exc
    descr = load_description(str(path))
    tensor_in, tensor_out = descr.inputs[0].id, descr.outputs[0].id
    x = Tensor.from_numpy(image[None].astype(np.float32), dims=("batch", "channel", "y", "x"))
    sample = predict(model=descr, inputs={tensor_in: x}, blocksize_parameter=8)
    probs = np.asarray(sample.members[tensor_out].data)[0]
    names = [str(n) for n in descr.outputs[0].axes[1].channel_names]
    config = descr.config.model_dump().get("scarce") or {}
    return probs, config.get("target", "semantic"), names, {}


def predict_layers(
    source, data, *, rgb: bool = False, instances: bool = True, tile_size: int | None = None
) -> list[tuple]:
    """Run a model on an image layer's data; labels (and probabilities) as layer tuples.

    Parameters
    ----------
    source : path-like
        A Scarce checkpoint (``.pt``) or run folder, or a bioimage.io package (``.zip``).
    data : array
        The image layer's data, see :func:`as_chw`.
    rgb : bool
        The layer is RGB(A) ``(H, W, 3|4)``.
    instances : bool
        Also return instance labels (``instances_from_prediction`` with the model's target).
    tile_size : int, optional
        Sliding-window tile of Scarce models, pixels (default: the checkpoint's).

    Returns
    -------
    list of (ndarray, dict, str)
        ``(class map (H, W) uint8, {"name": "... classes"}, "labels")``, the instances the same
        way, and the probabilities ``(K, H, W)`` as an image layer (hidden).

    Raises
    ------
    scarce.errors.MissingInputError
        If ``source`` does not exist.
    """
    from scarce.segment.predict import instances_from_prediction

    source = Path(source)
    if not source.exists():
        raise MissingInputError(f"{source}: no such model (checkpoint, run folder or .zip)")
    image = as_chw(data, rgb)
    if source.suffix.lower() in (".zip", ".yaml"):
        probs, rule, names, options = _bioimageio_probabilities(source, image)
    else:
        probs, rule, names, options = _scarce_probabilities(source, image, tile_size)
    stem = source.stem
    layers = [
        (
            probs.argmax(0).astype(np.uint8),
            {"name": f"{stem} classes", "metadata": {"class_names": names}},
            "labels",
        ),
        (probs, {"name": f"{stem} probabilities", "visible": False, "channel_axis": 0}, "image"),
    ]
    if instances:
        labels = instances_from_prediction(probs, rule, **options)
        layers.insert(1, (labels, {"name": f"{stem} instances"}, "labels"))
    return layers


__all__ = ["as_chw", "predict_layers"]

"""Export a trained network to TorchScript or ONNX, with its metadata, for use outside Scarce.

The exported network takes ``(N, C, H, W)`` float32 for any N and any H, W that are multiples of
``size_multiple`` (dynamic axes). What a user needs to prepare inputs and read outputs travels
with it, in the file (TorchScript ``_extra_files["scarce.json"]``, ONNX ``metadata_props``
key ``"scarce"``) and in a JSON file beside it (``<out>.json``): the engine's part (model,
``size_multiple``, halo, versions) and the task's part (for segmentation the normalisation,
class names and target rule: :func:`scarce.segment.export.export_model` adds them).

Every export is checked before it is reported done: the exported model runs on an input of
another size and batch than the export example and must give the PyTorch logits within
``CHECK_ATOL``.

ONNX needs the optional extra: ``pip install 'scarce[onnx]'`` (onnx, onnxscript, and
onnxruntime for the check).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from scarce.engine.checkpoint import load_model
from scarce.errors import InputError

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
CHECK_ATOL = 1e-4  # largest |exported - PyTorch| logit difference accepted by the check


def base_metadata(model: torch.nn.Module, ckpt: dict, fmt: str) -> dict:
    """The engine's part of an exported model's metadata.

    Parameters
    ----------
    model : torch.nn.Module
        The rebuilt network (``size_multiple``, ``halo`` are read).
    ckpt : dict
        Its checkpoint (task, model spec, extras, predict config, versions).
    fmt : {"torchscript", "onnx"}

    Returns
    -------
    dict
        ``format``, ``export_format``, ``task``, ``model`` (name and constructor
        arguments), ``in_channels``, ``size_multiple``, ``halo`` (pixels), ``predict``
        (sliding-window defaults), ``extras`` (the task's checkpoint extras),
        ``source_checkpoint``, ``versions``.
    """
    return {
        "format": "scarce-export",
        "export_format": fmt,
        "task": ckpt.get("task"),
        "model": dict(ckpt["model"]),
        "in_channels": int(model.arguments["in_channels"]),
        "size_multiple": int(getattr(model, "size_multiple", 1)),
        "halo": int(getattr(model, "halo", 0)),
        "predict": dict(ckpt.get("config", {}).get("predict", {})),
        "extras": ckpt.get("extras"),
        "source_checkpoint": ckpt.get("path"),
        "versions": {k: str(v) for k, v in (ckpt.get("versions") or {}).items()},
    }


def probe_input(batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """A deterministic, non-constant test image ``(batch, channels, height, width)`` float32.

    Smooth stripes of different frequency per channel and sample, roughly zero-mean and unit
    variance like a normalised image (no randomness, so checks are reproducible).
    """
    y = torch.arange(height, dtype=torch.float32)[:, None]
    x = torch.arange(width, dtype=torch.float32)[None, :]
    planes = [
        torch.sin(0.11 * (n + 1) * y + 0.3 * c) * torch.cos(0.07 * (c + 1) * x - 0.2 * n) * 1.4
        for n in range(batch)
        for c in range(channels)
    ]
    return torch.stack(planes).reshape(batch, channels, height, width)


def _check_export(run, model: torch.nn.Module, channels: int, multiple: int, what: str) -> float:
    """Compare ``run(x) -> ndarray`` with ``model(x)`` on a batch of 3 of another size.

    Raises
    ------
    RuntimeError
        If the logits differ by more than ``CHECK_ATOL`` (or the shapes differ).
    """
    x = probe_input(3, channels, 6 * multiple, 3 * multiple)
    with torch.inference_mode():
        expected = model(x).numpy()
    got = np.asarray(run(x))
    if got.shape != expected.shape:
        raise RuntimeError(
            f"{what}: exported model gives shape {got.shape} for input "
            f"{tuple(x.shape)}, PyTorch gives {expected.shape}"
        )
    diff = float(np.abs(got - expected).max())
    if not diff <= CHECK_ATOL:
        raise RuntimeError(
            f"{what}: exported logits differ from PyTorch by {diff:.3g} "
            f"(> {CHECK_ATOL}) on an input of {tuple(x.shape)}"
        )
    logger.info("%s: max |exported - PyTorch| = %.2g on %s", what, diff, tuple(x.shape))
    return diff


def _export_torchscript(model, example: torch.Tensor, out: Path, meta: dict) -> None:
    """Script the model (trace if scripting fails), check it at another size, save."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        try:
            module = torch.jit.script(model)
        except Exception as exc:  # scripting rejects some Python; tracing is the fallback
            logger.info("torch.jit.script failed (%s); tracing instead", exc)
            with torch.no_grad():
                module = torch.jit.trace(model, example, check_trace=False)
    channels, multiple = meta["in_channels"], meta["size_multiple"]
    _check_export(lambda x: module(x).detach().numpy(), model, channels, multiple, str(out))
    torch.jit.save(module, str(out), _extra_files={"scarce.json": json.dumps(meta)})


def _onnx_modules():
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as exc:
        raise ImportError(
            f"ONNX export needs the optional packages onnx and onnxscript "
            f"({exc}); install them with: pip install 'scarce[onnx]'"
        ) from exc
    return onnx


def _export_onnx(model, example: torch.Tensor, out: Path, meta: dict) -> None:
    """torch.export-based ONNX export with dynamic N, H, W (legacy exporter as fallback)."""
    onnx = _onnx_modules()
    multiple = meta["size_multiple"]
    names = dict(input_names=["image"], output_names=["logits"])
    dim = torch.export.Dim
    shapes = {
        "x": {
            0: dim("n", min=1),
            2: multiple * dim("h_cells", min=1),
            3: multiple * dim("w_cells", min=1),
        }
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            program = torch.onnx.export(
                model, (example,), dynamo=True, dynamic_shapes=shapes, verbose=False, **names
            )
            program.save(str(out))
        except Exception as exc:  # fall back to the TorchScript-based exporter
            logger.warning(
                "dynamo ONNX export failed (%s); using the TorchScript-based exporter", exc
            )
            axes = {"image": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n", 2: "h", 3: "w"}}
            torch.onnx.export(
                model,
                (example,),
                str(out),
                dynamo=False,
                dynamic_axes=axes,
                opset_version=18,
                **names,
            )
    proto = onnx.load(str(out))
    onnx.helper.set_model_props(proto, {"scarce": json.dumps(meta)})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    try:
        import onnxruntime as ort
    except ImportError:
        logger.warning(
            "onnxruntime is not installed: the exported ONNX model was not "
            "checked against PyTorch (pip install 'scarce[onnx]')"
        )
        return
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    _check_export(
        lambda x: session.run(None, {"image": x.numpy()})[0],
        model,
        meta["in_channels"],
        multiple,
        str(out),
    )


def export_network(
    model_path: str | os.PathLike, fmt: str, out: str | os.PathLike, *, describe=None
) -> Path:
    """Export a checkpoint's network to TorchScript or ONNX, with metadata, checked.

    Parameters
    ----------
    model_path : path-like
        Checkpoint file or run folder (``checkpoints/best.pt``, else ``last.pt``).
    fmt : {"torchscript", "onnx"}
        ``torchscript``: ``torch.jit.script`` (``torch.jit.trace`` if scripting fails),
        metadata in ``_extra_files["scarce.json"]``; load with ``torch.jit.load``.
        ``onnx``: ``torch.onnx.export(dynamo=True)`` with dynamic batch and H, W as
        multiples of ``size_multiple`` (the TorchScript-based exporter with dynamic axes if
        that fails), opset from the exporter, metadata in ``metadata_props["scarce"]``; input
        ``"image"``, output ``"logits"``.
    out : path-like
        Model file to write (e.g. ``model.pt`` or ``model.onnx``); its folder is created.
        ``<out>.json`` is written beside it with the same metadata (see
        :func:`base_metadata`).
    describe : callable, optional
        ``describe(model, ckpt) -> dict``: the task's part of the metadata, merged over the
        engine's (segmentation: :func:`scarce.segment.export.export_metadata`).

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    InputError
        For an unknown ``fmt`` or an output folder that cannot be created.
    ImportError
        For ONNX without onnx/onnxscript installed (says ``pip install 'scarce[onnx]'``).
    RuntimeError
        If the exported model's logits differ from PyTorch's by more than ``CHECK_ATOL`` on
        an input of another size (``3 x C x 6m x 3m``, m = ``size_multiple``).
    scarce.engine.checkpoint.CheckpointError
        For a missing or invalid checkpoint.

    References
    ----------
    PyTorch ``torch.export`` / ``torch.onnx.export`` (dynamo) documentation; ONNX
    specification, https://onnx.ai (model ``metadata_props``).
    """
    if fmt not in FORMATS:
        raise InputError(f"export format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"cannot create the folder of {out} ({exc}); choose another --out"
        ) from exc
    if fmt == "onnx":
        _onnx_modules()  # fail before loading anything if the extra is missing
    model, ckpt = load_model(model_path, "cpu")
    meta = {**base_metadata(model, ckpt, fmt), **(describe(model, ckpt) if describe else {})}
    m = meta["size_multiple"]
    example = probe_input(2, meta["in_channels"], 4 * m, 5 * m)  # N=2: N=1 would specialise
    if fmt == "torchscript":
        _export_torchscript(model, example, out, meta)
    else:
        _export_onnx(model, example, out, meta)
    side = Path(f"{out}.json")
    side.write_text(json.dumps(meta, indent=2))
    logger.info("exported %s to %s (metadata: %s)", fmt, out, side)
    return out


def read_export_metadata(path: str | os.PathLike) -> dict:
    """Metadata stored inside an exported model file (TorchScript or ONNX).

    Raises
    ------
    ValueError
        If the file holds no Scarce metadata.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        onnx = _onnx_modules()
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        text = props.get("scarce")
    else:
        files = {"scarce.json": ""}
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
        text = files["scarce.json"]
    if not text:
        raise ValueError(f"{path}: no Scarce metadata in this file; was it made by scarce export?")
    return json.loads(text)

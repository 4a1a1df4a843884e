"""Checkpoints: save atomically, load safely (``weights_only=True``), rebuild the model.

A checkpoint is a dict of tensors and plain Python values, so that
``torch.load(path, weights_only=True)`` can read it and a planted pickle payload cannot run code:

- ``format`` (``"scarce-checkpoint"``) and ``format_version``;
- ``model``: ``{"name", "in_channels", "num_classes", "options"}`` and ``model_state``;
- ``config``: the resolved :class:`~scarce.config.TrainConfig` as nested plain values;
- ``normalization``: the spec from :func:`scarce.normalize.normalization_spec`;
- ``class_names``, ``mask_kind`` (of the training database), ``target`` (resolved rule:
  ``class`` | ``semantic`` | ``boundary``), ``ignore_label``;
- training state (only in training checkpoints): ``step``, ``best``, ``optimizer``,
  ``scheduler``, ``scaler``, ``rng``;
- ``versions``: scarce, torch and python versions that wrote it.

Training, prediction and export all use this module, so the predictor never imports the trainer.
"""

from __future__ import annotations

import os
import pickle
import platform
from pathlib import Path
from typing import Any

import torch

FORMAT = "scarce-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unsafe, corrupt or not a Scarce checkpoint (names the file)."""


def versions() -> dict:
    """Versions of scarce, torch and python, recorded in every checkpoint."""
    from scarce import __version__

    return {
        "scarce": __version__,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, then ``os.replace``.

    ``format``, ``format_version`` and ``versions`` are added. A crash while writing leaves the
    previous file intact.

    Parameters
    ----------
    path : path-like
        Destination, e.g. ``RUN_DIR/checkpoints/last.pt``.
    state : dict
        Tensors and plain values only (see the module docstring).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(), **state}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(full, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def resolve_checkpoint(path: str | os.PathLike, which: str = "best") -> Path:
    """A checkpoint file from a file path or a run folder.

    Parameters
    ----------
    path : path-like
        A ``.pt`` file, or a run folder holding ``checkpoints/{best,last}.pt``.
    which : {"best", "last"}
        Preferred file in a run folder; the other is used if it is missing.

    Raises
    ------
    CheckpointError
        If nothing usable is found.
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        order = ["best.pt", "last.pt"] if which == "best" else ["last.pt", "best.pt"]
        for name in order:
            candidate = path / "checkpoints" / name
            if candidate.is_file():
                return candidate
        raise CheckpointError(
            f"{path}: no checkpoints/best.pt or checkpoints/last.pt in this "
            "run folder; is it a `scarce train` output folder?"
        )
    raise CheckpointError(f"{path}: no such checkpoint file or run folder")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    Parameters
    ----------
    path : path-like
        A ``.pt`` file or a run folder (see :func:`resolve_checkpoint`).

    Returns
    -------
    dict
        The checkpoint (see the module docstring).

    Raises
    ------
    CheckpointError
        If the file holds anything but tensors and plain values (e.g. a pickled object that
        could run code), is corrupt, or is not a Scarce checkpoint.
    """
    file = resolve_checkpoint(path)
    try:
        ckpt = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{file}: refused to load: it contains objects other than tensors and plain "
            f"values, which could run code when unpickled ({exc.__class__.__name__}). Only load "
            "checkpoints written by Scarce from sources you trust."
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{file}: unreadable or truncated checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a Scarce checkpoint (no format marker)")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: checkpoint format {ckpt['format_version']} is newer than "
            f"this Scarce understands ({FORMAT_VERSION}); upgrade Scarce"
        )
    ckpt["path"] = str(file)
    return ckpt


def build_model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the network stored in ``ckpt`` with its weights, in eval mode, on ``device``.

    Raises
    ------
    CheckpointError
        If the stored weights do not fit the stored architecture.
    """
    from scarce.models import build_model

    spec = ckpt["model"]
    model = build_model(spec["name"], spec["in_channels"], spec["num_classes"], **spec["options"])
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{ckpt.get('path', 'checkpoint')}: weights do not match the "
            f"stored architecture {spec}: {exc}"
        ) from exc
    return model.to(device).eval()


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a checkpoint (file or run folder) and rebuild its model.

    Returns
    -------
    model : torch.nn.Module
        In eval mode on ``device``.
    ckpt : dict
        The checkpoint, for its normalisation, class names, target rule and config.
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    return build_model_from_checkpoint(ckpt, device), ckpt

"""Checkpoints: save atomically, load safely (``weights_only=True``), rebuild the model.

A checkpoint is a dict of tensors and plain Python values, so that
``torch.load(path, weights_only=True)`` can read it and a planted pickle payload cannot run code.
Format version 2:

- ``format`` (``"scarce-checkpoint"``) and ``format_version``;
- ``task``: the task that trained it (``"segment"`` or ``"align"``);
- ``model``: ``{"name", "arguments"}`` (rebuilt with ``build_model(name, **arguments)``) and
  ``model_state``;
- ``config``: the resolved task config as nested plain values;
- ``extras``: what the task needs to use the model (segmentation: ``normalization`` and
  ``target``, the :class:`~scarce.segment.targets.TargetSpec` as a dict);
- training state (only in training checkpoints): ``step``, ``best``, ``optimizer``,
  ``scheduler``, ``scaler``, ``rng``;
- ``versions``: scarce, torch and python versions that wrote it.

Version 1 (segmentation only; model ``{"name", "in_channels", "num_classes", "options"}``
and ``normalization``, ``class_names``, ``mask_kind``, ``target``, ``ignore_label`` at the top)
is upgraded to version 2 when loaded.

Training, prediction and export all use this module, so the predictor never imports the trainer.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import platform
from pathlib import Path
from typing import Any

import torch

from scarce import atomic
from scarce.errors import CheckpointError
from scarce.models import build_model

logger = logging.getLogger("scarce")

FORMAT = "scarce-checkpoint"
FORMAT_VERSION = 2


def versions() -> dict:
    """Versions of scarce, torch and python, recorded in every checkpoint."""
    from scarce import __version__

    return {
        "scarce": __version__,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically and durably; the previous file survives any failure.

    ``format``, ``format_version`` and ``versions`` are added. The checkpoint is serialised in
    memory first (so its size is known and a full disk reports an ``errno``, which
    ``torch.save`` writing to a file does not), written to a temporary file beside ``path``,
    flushed with ``fsync`` and renamed over ``path`` (:func:`scarce.atomic.atomic_output`).
    A crash, ``kill -9`` or power cut while writing leaves the previous file intact; the
    temporary file of a killed writer is removed by the next run (:func:`sweep_checkpoints`).

    Parameters
    ----------
    path : path-like
        Destination, e.g. ``RUN_DIR/checkpoints/last.pt``.
    state : dict
        Tensors and plain values only (see the module docstring).

    Raises
    ------
    scarce.errors.WriteError
        If the disk is full or read-only (names the path, the free space and the size).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(), **state}
    buffer = io.BytesIO()
    torch.save(full, buffer)
    return atomic.write_bytes(path, buffer.getbuffer(), durable=True)


def sweep_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary checkpoint files that killed runs left in ``folder`` (logged).

    Only Scarce's temporary names (``.NAME.tmp-PID@HOST-...``) of writers no longer running
    go (see :func:`scarce.atomic.sweep_stale`); finished checkpoints are never touched.
    """
    return atomic.sweep_stale(folder)


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
        if "global" not in str(exc).lower():  # not a refused object: bytes that are no pickle
            raise CheckpointError(f"{file}: unreadable or truncated checkpoint") from exc
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
    if ckpt.get("format_version", 1) == 1:
        ckpt = _upgrade_v1(ckpt)
    ckpt["path"] = str(file)
    return ckpt


def _upgrade_v1(ckpt: dict) -> dict:
    """A version-1 checkpoint (segmentation only) in the version-2 layout."""
    spec = ckpt["model"]
    target = {
        "mask_kind": ckpt.get("mask_kind", "class"),
        "rule": ckpt.get("target", "class"),
        "boundary_width": int(ckpt.get("config", {}).get("data", {}).get("boundary_width", 2)),
        "ignore_label": ckpt.get("ignore_label"),
        "num_classes": int(spec["num_classes"]),
        "class_names": list(ckpt.get("class_names") or []),
    }
    moved = ("normalization", "class_names", "mask_kind", "target", "ignore_label")
    upgraded = {k: v for k, v in ckpt.items() if k not in moved}
    upgraded.update(
        format_version=FORMAT_VERSION,
        task="segment",
        model={
            "name": spec["name"],
            "arguments": {
                "in_channels": spec["in_channels"],
                "num_classes": spec["num_classes"],
                **spec["options"],
            },
        },
        extras={"normalization": ckpt["normalization"], "target": target},
    )
    return upgraded


def build_model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the network stored in ``ckpt`` with its weights, in eval mode, on ``device``.

    Raises
    ------
    CheckpointError
        If the stored weights do not fit the stored architecture.
    """
    spec = ckpt["model"]
    model = build_model(spec["name"], **spec["arguments"])
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
        The checkpoint (version-2 layout), for its task, extras and config.
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    return build_model_from_checkpoint(ckpt, device), ckpt


def load_matching_weights(model: torch.nn.Module, path) -> None:
    """Copy the tensors of checkpoint ``path`` whose names and shapes match into ``model``.

    Used to fine-tune from another run (``--init-from``): tensors whose shapes differ (e.g. a
    classifier for another number of classes) keep their initial values and are logged.

    Raises
    ------
    CheckpointError
        If ``path`` is not a usable checkpoint or run folder.
    """
    state = load_checkpoint(path)["model_state"]
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    logger.info(
        "Initialised from %s (%d tensors; %d kept their initial values%s)",
        *(path, len(usable), len(skipped), f": {skipped[:6]}" if skipped else ""),
    )

"""Scarce: deep learning for scarce microscopy data.

Folders of images and label masks become LMDB databases (:func:`ingest`), parallel augmenting
readers feed a U-Net or SegNet trained by the task-agnostic engine
(:class:`SegmentationTask` given to :class:`Trainer`, or :func:`train` in one call), and a
sliding-window predictor and biologist-friendly metrics turn the trained model into masks and
numbers (:func:`predict_files`, :func:`evaluate_folders`). The command line (``scarce ...``) is
a thin face over these same functions.

The package is laid out by pipeline stage: ``data`` (ingest, store, readers' machinery,
augmentation), ``models`` (registry), ``engine`` (trainer, checkpoints, DDP, tiling, export),
``segment`` and ``align`` (the tasks), and the faces ``cli`` and ``demo``. This module lists
the public API (``__all__``); names are imported from their modules lazily (PEP 562), so
``import scarce`` stays fast and the CLI starts quickly.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ScarceError": "scarce.errors",
    "TrainConfig": "scarce.config",
    "load_config": "scarce.config",
    "override": "scarce.config",
    "read_image": "scarce.io",
    "read_mask": "scarce.io",
    "write_label_image": "scarce.io",
    "ingest": "scarce.data.ingest",
    "inspect_database": "scarce.data.inspect",
    "SampleStore": "scarce.data.store",
    "augment_patch": "scarce.data.augment",
    "build_model": "scarce.models",
    "MODELS": "scarce.models",
    "Trainer": "scarce.engine.trainer",
    "load_model": "scarce.engine.checkpoint",
    "sliding_window_logits": "scarce.engine.tiling",
    "export_model": "scarce.segment.export",
    "SegmentationTask": "scarce.segment.task",
    "train": "scarce.segment.task",
    "make_train_loader": "scarce.segment.readers",
    "iter_test_images": "scarce.segment.readers",
    "SegmentationLoss": "scarce.segment.losses",
    "derive_target": "scarce.segment.targets",
    "predict_image": "scarce.segment.predict",
    "predict_files": "scarce.segment.predict",
    "instances_from_prediction": "scarce.segment.predict",
    "evaluate_arrays": "scarce.segment.evaluate",
    "evaluate_folders": "scarce.segment.evaluate",
    "plan_run": "scarce.segment.plan",
    "learning_curve": "scarce.segment.curve",
    "run_demo": "scarce.demo",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    """Import a public name from its module on first use (PEP 562)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'scarce' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

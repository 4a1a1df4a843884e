"""Scarce: deep learning for scarce microscopy data.

Folders of images and label masks become LMDB databases (:func:`scarce.ingest.ingest`),
parallel augmenting readers feed a U-Net or SegNet (:class:`Trainer`), and a sliding-window predictor and
biologist-friendly metrics turn the trained model into masks and numbers
(:func:`predict_files`, :func:`evaluate_folders`). The command line (``scarce ...``) is a thin
face over these same functions.

Names are imported lazily (PEP 562), so ``import scarce`` stays fast and the CLI starts quickly.
Functions named like their module (``scarce.ingest.ingest``, ``scarce.train.train``) are not
re-exported: a package attribute cannot be both.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "IngestError": "scarce.ingest",
    "inspect_database": "scarce.store",
    "SampleStore": "scarce.store",
    "read_image": "scarce.io",
    "read_mask": "scarce.io",
    "write_label_image": "scarce.io",
    "TrainConfig": "scarce.config",
    "load_config": "scarce.config",
    "override": "scarce.config",
    "augment_patch": "scarce.augment",
    "make_train_loader": "scarce.readers",
    "iter_test_images": "scarce.readers",
    "build_model": "scarce.models",
    "MODELS": "scarce.models",
    "SegmentationLoss": "scarce.losses",
    "derive_target": "scarce.targets",
    "Trainer": "scarce.train",
    "load_model": "scarce.checkpoint",
    "sliding_window_logits": "scarce.tiling",
    "predict_image": "scarce.predict",
    "predict_files": "scarce.predict",
    "instances_from_prediction": "scarce.predict",
    "evaluate_arrays": "scarce.evaluate",
    "evaluate_folders": "scarce.evaluate",
    "export_model": "scarce.export",
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

"""Scarce: deep learning for scarce microscopy data.

Folders of images and label masks become LMDB databases (:mod:`scarce.ingest`), parallel
augmenting readers feed a U-Net or SegNet (:mod:`scarce.readers`, :mod:`scarce.train`), and a
sliding-window predictor and biologist-friendly metrics turn the trained model into masks and
numbers (:mod:`scarce.predict`, :mod:`scarce.evaluate`).
"""

__version__ = "0.1.0"

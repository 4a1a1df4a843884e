"""What ingest reads: image files or Zarr images, and masks with an optional label map.

:class:`FileReader` reads one image ``(C, H, W)`` or mask ``(H, W)`` from a TIFF/PNG/JPEG/BMP
file (:mod:`scarce.io`) or a ``.zarr``/``.ome.zarr`` folder (:mod:`scarce.data.omezarr`, read
whole: ingest stores whole images or tiles of them), and applies a **label map** to masks, so
that annotations made in other tools train directly. :func:`parse_label_map` reads the
``--label-map`` text:

- ``ilastik``: ilastik's exported labels/scribbles, where 0 = not annotated and classes
  count from 1: ``0 -> ignore``, ``k -> k - 1``;
- explicit pairs ``"0:ignore,1:0,2:1,3:1"``: every mask value that occurs must be listed.

``ignore`` is the dataset's ``ignore_label`` (``dataset.yaml``), else :data:`IGNORE_DEFAULT`,
which is then recorded as the database's ``ignore_label`` (losses and metrics skip it).

References
----------
Berg S. et al. "ilastik: interactive machine learning for (bio)image analysis." Nature
Methods 16:1226-1232 (2019). doi:10.1038/s41592-019-0582-9 (label export: 0 = unlabelled).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from scarce import io
from scarce.data import omezarr
from scarce.errors import ImageFileError, InputError

IGNORE_DEFAULT = 255  # ignore label when a label map ignores values and dataset.yaml sets none


@dataclass(frozen=True)
class LabelMap:
    """Mask value -> class id (or ``None`` = ignore); ``shift``: ilastik's ``k -> k - 1``."""

    pairs: tuple[tuple[int, int | None], ...] = ()
    shift: bool = False
    ignore_value: int = IGNORE_DEFAULT

    @property
    def ignores(self) -> bool:
        """True when some value becomes the ignore label."""
        return self.shift or any(v is None for _, v in self.pairs)

    def apply(self, mask: np.ndarray, path) -> np.ndarray:
        """The mapped mask ``(H, W)``, in the smallest unsigned dtype that fits.

        Raises
        ------
        scarce.errors.ImageFileError
            If the mask holds a value the map does not list (names the values).
        """
        if self.shift:
            out = mask.astype(np.int64) - 1
            out[mask == 0] = self.ignore_value
        else:
            table = dict(self.pairs)
            if missing := sorted(set(np.unique(mask).tolist()) - set(table)):
                raise ImageFileError(
                    path, f"mask values {missing} are not in --label-map {self.text()}"
                )
            out = np.zeros(mask.shape, np.int64)
            for value, target in table.items():
                out[mask == value] = self.ignore_value if target is None else target
        return out.astype(io.smallest_label_dtype(int(out.max(initial=0))))

    def text(self) -> str:
        """The map as ``--label-map`` takes it."""
        if self.shift:
            return "ilastik"
        return ",".join(f"{k}:{'ignore' if v is None else v}" for k, v in self.pairs)


def parse_label_map(text: str | None) -> LabelMap | None:
    """Read ``--label-map``: ``ilastik`` or ``"value:class,...,value:ignore"``.

    Raises
    ------
    scarce.errors.InputError
        For malformed pairs, negative or repeated values.
    """
    if not text:
        return None
    if text.strip().lower() == "ilastik":
        return LabelMap(shift=True)
    pairs: dict[int, int | None] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition(":")
        try:
            source = int(key)
            target = None if value.strip().lower() == "ignore" else int(value)
        except ValueError:
            source = target = -1
        if not sep or source < 0 or (target is not None and target < 0) or source in pairs:
            raise InputError(
                f"--label-map: cannot read {item.strip()!r}; expected 'ilastik' or pairs "
                "VALUE:CLASS or VALUE:ignore of non-negative integers, each value once "
                "(e.g. 0:ignore,1:0,2:1)"
            )
        pairs[source] = target
    return LabelMap(tuple(sorted(pairs.items())))


def list_inputs(folder: str | os.PathLike) -> list[Path]:
    """Image files and ``.zarr`` folders in ``folder`` (not recursive, no hidden), by name."""
    zarrs = [p for p in Path(folder).iterdir() if p.is_dir() and omezarr.is_zarr(p)]
    zarrs = [p for p in zarrs if not p.name.startswith(".")]
    return sorted(io.list_image_files(folder) + zarrs)


@dataclass(frozen=True)
class FileReader:
    """Reads ingest's inputs: ``channel_axis`` for 3D image files, a label map for masks."""

    channel_axis: int | None = None
    label_map: LabelMap | None = None

    def for_dataset(self, meta: dict) -> FileReader:
        """This reader with the ignore value of ``meta`` (``dataset.yaml``), recording the
        default in ``meta["ignore_label"]`` when the label map ignores values and none is set."""
        if self.label_map is None or not self.label_map.ignores:
            return self
        if meta.get("ignore_label") is None:
            meta["ignore_label"] = IGNORE_DEFAULT
        return replace(self, label_map=replace(self.label_map, ignore_value=meta["ignore_label"]))

    def image(self, path: str | os.PathLike) -> np.ndarray:
        """``(C, H, W)`` of an image file or a Zarr image (see :func:`scarce.io.read_image`)."""
        if omezarr.is_zarr(path):
            return omezarr.read_image_array(path)
        return io.read_image(path, self.channel_axis)

    def mask(self, path: str | os.PathLike) -> np.ndarray:
        """``(H, W)`` labels of a mask file or Zarr array, label map applied."""
        if omezarr.is_zarr(path):
            mask = omezarr.read_image_array(path)
            if mask.shape[0] != 1 or mask.dtype.kind not in "biu":
                raise ImageFileError(path, f"a mask must be (H, W) integers, got {mask.shape}")
            mask = mask[0]
            if mask.dtype.kind == "i" and mask.size and mask.min() < 0:
                raise ImageFileError(path, f"mask has negative labels (min {mask.min()})")
        else:
            mask = io.read_mask(path)
        return mask if self.label_map is None else self.label_map.apply(mask, path)


__all__ = ["IGNORE_DEFAULT", "FileReader", "LabelMap", "list_inputs", "parse_label_map"]

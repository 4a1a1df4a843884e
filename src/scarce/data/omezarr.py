"""OME-Zarr in and out: open an image lazily as a Dask array, write label images beside it.

Images larger than memory live in OME-Zarr (OME-NGFF): a Zarr group whose ``multiscales``
metadata names the axes, their units and the scale of each resolution level. Scarce reads the
full-resolution level as a ``dask.array`` ``(C, Y, X)`` (nothing is read until a block is
computed) with its pixel size in micrometres, and writes class maps, instances and
probabilities as OME-Zarr images/label images with the same pixel size, through the
``ome-zarr`` package. A plain Zarr array (no OME metadata) ``(H, W)``, ``(H, W, C)`` or
``(C, H, W)`` is read too, without a pixel size.

Needs the optional extra ``pip install 'scarce[zarr]'`` (``ome-zarr``, ``dask``).

References
----------
Moore J. et al. "OME-NGFF: a next-generation file format for expanding bioimaging data-access
strategies." Nature Methods 18:1496-1498 (2021). doi:10.1038/s41592-021-01326-w;
https://ngff.openmicroscopy.org (0.4: multiscales, axes, coordinateTransformations, labels).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scarce.data.install import install_folder
from scarce.errors import ImageFileError, InputError
from scarce.io import to_chw

logger = logging.getLogger(__name__)
logging.getLogger("ome_zarr").setLevel(logging.ERROR)  # it logs every array it writes at INFO

ZARR_SUFFIXES = (".zarr",)  # ".ome.zarr" ends with ".zarr" too
SPACE_UNITS = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3}  # -> micrometres
NGFF_VERSION = "0.4"  # Zarr v2 layout; read by Fiji (n5-zarr, MoBIE), QuPath, napari, ilastik


@dataclass(frozen=True)
class LazyImage:
    """A ``(C, H, W)`` image that is read block by block.

    Attributes
    ----------
    array : dask.array.Array, shape (C, H, W)
        The full-resolution level, in the file's dtype and chunks.
    pixel_size_um : float or None
        Micrometres per pixel along y and x (their mean when they differ), if recorded.
    path : pathlib.Path
    """

    array: object
    pixel_size_um: float | None
    path: Path


def is_zarr(path: str | os.PathLike) -> bool:
    """True for a ``.zarr``/``.ome.zarr`` folder (the suffix decides, as for image files)."""
    return Path(path).suffix.lower() in ZARR_SUFFIXES


def _modules():
    try:
        import dask.array as da
        import zarr
        from ome_zarr.io import parse_url
        from ome_zarr.reader import Multiscales, Reader
    except ImportError as exc:
        raise InputError(
            f"OME-Zarr needs the optional packages ome-zarr and dask ({exc}); install them "
            "with: pip install 'scarce[zarr]'"
        ) from exc
    return da, zarr, parse_url, Reader, Multiscales


def _pixel_size(axes: list[dict], transforms: list[dict], path: Path) -> float | None:
    """Micrometres per pixel from the first level's scale of the y and x axes."""
    scale = next((t["scale"] for t in transforms or [] if t.get("type") == "scale"), None)
    if scale is None:
        return None
    sizes = []
    for axis, value in zip(axes, scale):
        if axis.get("name") in ("y", "x"):
            unit = axis.get("unit")
            if unit is None:
                return None
            if unit not in SPACE_UNITS:
                logger.warning("%s: unknown space unit %r; pixel size not used", path, unit)
                return None
            sizes.append(float(value) * SPACE_UNITS[unit])
    if len(sizes) != 2:
        return None
    if not np.isclose(sizes[0], sizes[1], rtol=1e-3):
        logger.warning("%s: pixels are %g x %g um; using their mean", path, *sizes)
    return float(np.mean(sizes))


def _to_cyx(array, names: list[str], path: Path):
    """Reorder an OME-Zarr level to ``(C, Y, X)``; t/z axes must have length 1."""
    problems = [f"{n}={array.shape[i]}" for i, n in enumerate(names) if n in ("t", "z")]
    problems = [p for p in problems if not p.endswith("=1")]
    if problems or not {"y", "x"} <= set(names):
        raise ImageFileError(
            path,
            f"expected a 2D image with axes (c,) y, x (t and z of length 1), got axes "
            f"{names} and shape {tuple(array.shape)}; select one plane first",
        )
    index = tuple(0 if n in ("t", "z") else slice(None) for n in names)
    kept = [n for n in names if n not in ("t", "z")]
    array = array[index]
    if "c" not in kept:
        return array[None]
    return array.transpose(kept.index("c"), kept.index("y"), kept.index("x"))


def open_image(path: str | os.PathLike) -> LazyImage:
    """Open an OME-Zarr image (or a plain Zarr array) lazily as ``(C, H, W)``.

    Parameters
    ----------
    path : path-like
        An OME-Zarr image group (``.ome.zarr``; the first image found, its full-resolution
        level) or a Zarr array ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``.

    Returns
    -------
    LazyImage
        Nothing but metadata is read.

    Raises
    ------
    scarce.errors.ImageFileError
        If ``path`` is not a readable Zarr image, or has t/z axes longer than 1.
    scarce.errors.InputError
        If the ``zarr`` extra is not installed.
    """
    da, zarr, parse_url, Reader, Multiscales = _modules()
    path = Path(path)
    if not path.is_dir():
        raise ImageFileError(path, "no such Zarr folder")
    location = parse_url(str(path))
    nodes = list(Reader(location)()) if location is not None else []
    for node in nodes:
        if node.data and any(isinstance(s, Multiscales) for s in node.specs):
            axes = node.metadata.get("axes") or []
            names = [a["name"] if isinstance(a, dict) else a for a in axes]
            transforms = (node.metadata.get("coordinateTransformations") or [[]])[0]
            size = _pixel_size([a for a in axes if isinstance(a, dict)], transforms, path)
            return LazyImage(_to_cyx(node.data[0], names, path), size, path)
    try:
        array = zarr.open_array(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a folder that is not an array
        raise ImageFileError(
            path, f"neither an OME-Zarr image nor a Zarr array ({type(exc).__name__}: {exc})"
        ) from exc
    return LazyImage(to_chw(da.from_array(array, chunks=array.chunks), path), None, path)


def read_image_array(path: str | os.PathLike) -> np.ndarray:
    """Read a whole (small) Zarr image into memory as ``(C, H, W)`` (e.g. for ingest).

    Raises
    ------
    scarce.errors.ImageFileError
        As :func:`open_image`, and for NaN/inf values in a float image.
    """
    image = np.ascontiguousarray(open_image(path).array.compute())
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ImageFileError(path, f"image has {int((~np.isfinite(image)).sum())} NaN/inf pixels")
    if image.dtype == np.float64:
        image = image.astype(np.float32)
    return image


def _axes_args(ndim: int, pixel_size_um: float | None) -> dict:
    """``axes``, ``scale`` and ``axes_units`` keywords of ome-zarr's writers, micrometres."""
    names = "cyx" if ndim == 3 else "yx"
    scale = {n: 1.0 if n == "c" else float(pixel_size_um or 1.0) for n in names}
    units = {"y": "micrometer", "x": "micrometer"} if pixel_size_um else None
    return {"axes": names, "scale": scale, "axes_units": units}


def staged(out: str | os.PathLike):
    """Write a Zarr group atomically: a context yielding an empty temporary folder beside
    ``out``, renamed over ``out`` when the block ends (:func:`scarce.data.install.install_folder`
    with ``overwrite=True``).

    On success an older ``out`` is replaced; on any exception the temporary group is removed
    and ``out`` is left as it was.
    """
    return install_folder(out, overwrite=True)


def write_image(group, image, *, pixel_size_um=None, chunks: int = 1024, compute=True) -> list:
    """Write ``image`` as the (single-level) OME-Zarr image of a new group ``group``.

    Parameters
    ----------
    group : path-like
        Folder of the group to create (NGFF 0.4, Zarr v2 layout).
    image : dask or numpy array, shape (C, H, W) or (H, W)
        E.g. probabilities ``(K, H, W)`` float32, or a class map.
    pixel_size_um : float, optional
        Micrometres per pixel: the y/x scale, with unit ``micrometer``.
    chunks : int
        Chunk side on disk, pixels.
    compute : bool
        ``False``: return the ``dask.delayed`` writes instead of writing now.

    Returns
    -------
    list
        The delayed writes (empty when ``compute``).
    """
    _, zarr, _, _, _ = _modules()
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image as ngff_write_image

    root = zarr.open_group(str(group), mode="w", zarr_format=2)
    side = (image.shape[0], chunks, chunks) if image.ndim == 3 else (chunks, chunks)
    return ngff_write_image(
        image,
        root,
        scale_factors=(),
        scaler=None,
        fmt=FormatV04(),
        storage_options={"chunks": side},
        compute=compute,
        **_axes_args(image.ndim, pixel_size_um),
    )


def write_labels(
    group, name: str, labels, *, pixel_size_um=None, chunks: int = 1024, compute=True
) -> list:
    """Write a label image ``(H, W)`` as ``labels/<name>`` of the OME-Zarr image ``group``.

    Parameters as :func:`write_image`; ``labels`` holds non-negative integers.

    References
    ----------
    https://ngff.openmicroscopy.org/0.4/#labels-md
    """
    _, zarr, _, _, _ = _modules()
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_labels as ngff_write_labels

    root = zarr.open_group(str(group), mode="r+", zarr_format=2)
    return ngff_write_labels(
        labels,
        root,
        name=name,
        scaler=None,
        scale_factors=(),
        fmt=FormatV04(),
        storage_options={"chunks": (chunks, chunks)},
        compute=compute,
        **_axes_args(2, pixel_size_um),
    )


def open_labels(group, name: str):
    """The label image ``labels/<name>`` of an OME-Zarr image group, lazily ``(H, W)``."""
    da, zarr, _, _, _ = _modules()
    node = zarr.open_group(str(Path(group) / "labels" / name), mode="r")
    level = node.attrs["multiscales"][0]["datasets"][0]["path"]
    return da.from_zarr(node[level])


__all__ = [
    "LazyImage",
    "is_zarr",
    "open_image",
    "open_labels",
    "read_image_array",
    "staged",
    "write_image",
    "write_labels",
]

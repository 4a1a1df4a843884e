"""Read and validate one image or mask file; write label images.

Files on disk may be ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``; inside Scarce an image is
always ``(C, H, W)`` and a mask ``(H, W)``. TIFF goes through tifffile, PNG/JPEG/BMP through
Pillow (16-bit colour PNGs, which Pillow would cut to 8 bits, through OpenCV). Every error
names the file and says what was expected. Arrays come back in native byte order.

Before a decoder runs, :mod:`scarce.headers` refuses empty, misnamed and unknown files and
broken or looping symbolic links, and reads the claimed shape from the header: more pixels
than the limit (default 2**31, ``--max-pixels``), more than 16 samples per pixel, or a shape
with no channel axis is refused without decoding. Writers go through :mod:`scarce.atomic`.

Dtype rules for images: uint8, uint16, int16, int32, uint32 and float32 are kept as they are
(readers compute in float32); bool becomes uint8; float64 becomes float32 (values outside the
float32 range are an error). Masks must hold non-negative integers: integer dtypes are kept,
float masks whose values are all integral are converted to the smallest fitting unsigned
dtype, anything else is an error. Palette PNG masks are read as their palette indices (the
labels); palette images are expanded to RGB(A).
"""

from __future__ import annotations

import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile

from scarce import atomic, headers
from scarce.errors import ImageFileError, MissingInputError
from scarce.headers import MAX_CHANNELS

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
MASK_EXTENSIONS = (".tif", ".tiff", ".png", ".bmp")
IMAGE_DTYPES = ("uint8", "uint16", "int16", "int32", "uint32", "float32")
MASK_DTYPES = ("uint8", "uint16", "int32", "uint32", "int8", "int16", "int64", "uint64")


def list_image_files(folder: str | os.PathLike, extensions=IMAGE_EXTENSIONS) -> list[Path]:
    """Files in ``folder`` (not recursive) whose suffix is in ``extensions``, sorted by name.

    Hidden files and folders are skipped; symbolic links that lead nowhere (dangling, or a
    loop) are kept, so that reading them reports the problem instead of dropping the file.

    Raises
    ------
    FileNotFoundError
        If ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"{folder} is not a directory")
    return sorted(
        p
        for p in folder.iterdir()
        if (p.is_file() or p.is_symlink())
        and not p.name.startswith(".")
        and p.suffix.lower() in extensions
    )


def stem_of(path: str | os.PathLike) -> str:
    """File name without its extension (``a/b/img_01.tif``, ``img_01.ome.zarr`` -> ``img_01``)."""
    name = Path(path).name
    return name[: -len(".ome.zarr")] if name.lower().endswith(".ome.zarr") else Path(path).stem


def _png_is_16bit_colour(path: Path) -> bool:
    """True for a PNG whose IHDR says 16 bits per sample and colour type RGB (2) or RGBA (6)."""
    with open(path, "rb") as f:
        head = f.read(26)
    return (
        len(head) == 26
        and head[:8] == b"\x89PNG\r\n\x1a\n"
        and head[24] == 16
        and head[25] in (2, 6)
    )


def _check_claims(path: Path, header: headers.Header, mask: bool, channel_axis) -> None:
    """Refuse, before decoding, a claimed shape over the limits or with no channel axis."""
    headers.check_shape(path, header)
    if not mask and len(header.shape) == 3:  # the same rule as after decoding, on no memory
        to_chw(np.broadcast_to(np.zeros((), np.uint8), header.shape), path, channel_axis)


def _read_cv2(path: Path) -> np.ndarray:
    import cv2  # imported here: only 16-bit colour PNGs need it

    array = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise OSError("OpenCV could not decode the file")
    order = [2, 1, 0, 3][: array.shape[-1]] if array.ndim == 3 else None
    return array if order is None else np.ascontiguousarray(array[..., order])  # BGR(A) -> RGB(A)


def _read_pillow(path: Path, mask: bool, channel_axis) -> np.ndarray:
    with headers.open_pillow(path) as image:
        _check_claims(path, headers.pillow_header(image), mask, channel_axis)
        if path.suffix.lower() == ".png" and _png_is_16bit_colour(path):
            return _read_cv2(path)  # Pillow would cut 16-bit colour to 8 bits
        if image.mode == "P" and not mask:
            image = image.convert(image.palette.mode)  # palette image -> RGB or RGBA colours
        elif image.mode == "PA" and mask:
            image = image.getchannel(0)  # palette indices are the labels; drop alpha
        elif image.mode == "CMYK":
            image = image.convert("RGB")
        return np.asarray(image)


def _read_tiff(path: Path, mask: bool, channel_axis) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        _check_claims(path, headers.tiff_header(tif), mask, channel_axis)
        return tif.asarray()


def _read_raw(path: Path, mask: bool = False, channel_axis=None) -> np.ndarray:
    """Decode ``path`` into an array in native byte order; any decoder error -> ImageFileError."""
    fmt = headers.check_file(path)
    try:
        if fmt == "TIFF":
            raw = _read_tiff(path, mask, channel_axis)
        else:
            raw = _read_pillow(path, mask, channel_axis)
    except ImageFileError:
        raise
    except Exception as exc:  # any decoder error means unreadable/truncated
        raise ImageFileError(
            path, f"unreadable or truncated file ({type(exc).__name__}: {exc})"
        ) from exc
    if not raw.dtype.isnative:
        raw = raw.astype(raw.dtype.newbyteorder("="))
    return raw


def to_chw(array: np.ndarray, path: str | os.PathLike, channel_axis: int | None = None):
    """Bring an array read from ``path`` into ``(C, H, W)`` order.

    Parameters
    ----------
    array : ndarray, shape (H, W), (H, W, C) or (C, H, W)
    path : path-like
        Named in errors.
    channel_axis : {None, 0, -1, 2}
        Where the channels are; ``None`` detects it: the only axis of length
        <= ``MAX_CHANNELS`` is the channel axis (if both ends are that short, the last one).

    Returns
    -------
    ndarray, shape (C, H, W)
        A view when possible.

    Raises
    ------
    ImageFileError
        For arrays with fewer than 2 or more than 3 axes, or no detectable channel axis.
    """
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3:
        raise ImageFileError(
            path, f"expected a 2D image (H, W) or (H, W, C)/(C, H, W), got shape {array.shape}"
        )
    if channel_axis is None:
        if array.shape[-1] <= MAX_CHANNELS:
            channel_axis = -1
        elif array.shape[0] <= MAX_CHANNELS:
            channel_axis = 0
        else:
            raise ImageFileError(
                path,
                f"cannot tell the channel axis of shape {array.shape} (no axis has <= "
                f"{MAX_CHANNELS} entries); pass channel_axis (--channel-axis) explicitly",
            )
    if channel_axis in (-1, 2):
        return np.moveaxis(array, -1, 0)
    if channel_axis == 0:
        return array
    raise ImageFileError(path, f"channel_axis must be 0 or -1, got {channel_axis}")


def read_image(path: str | os.PathLike, channel_axis: int | None = None) -> np.ndarray:
    """Read an image file as ``(C, H, W)``.

    Parameters
    ----------
    path : path-like
        TIFF, PNG, JPEG or BMP.
    channel_axis : {None, 0, -1}
        See :func:`to_chw`.

    Returns
    -------
    ndarray, shape (C, H, W), dtype one of ``IMAGE_DTYPES``
        Float images are finite.

    Raises
    ------
    ImageFileError
        Unreadable/truncated file, unsupported dtype, bad shape, NaN or inf values.
    """
    path = Path(path)
    raw = _read_raw(path, channel_axis=channel_axis)
    if raw.dtype == bool:
        raw = raw.astype(np.uint8)
    elif raw.dtype == np.float64:
        finite = raw[np.isfinite(raw)]
        if finite.size and np.abs(finite).max() > np.finfo(np.float32).max:
            raise ImageFileError(path, "float64 values exceed the float32 range")
        raw = raw.astype(np.float32)
    if raw.dtype.name not in IMAGE_DTYPES:
        raise ImageFileError(
            path, f"unsupported image dtype {raw.dtype}; supported: {', '.join(IMAGE_DTYPES)}"
        )
    image = to_chw(raw, path, channel_axis)
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        bad = int((~np.isfinite(image)).sum())
        raise ImageFileError(path, f"image has {bad} NaN/inf pixel(s)")
    return np.ascontiguousarray(image)


def smallest_label_dtype(max_value: int) -> np.dtype:
    """Smallest unsigned integer dtype that holds ``0..max_value``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a label image (class ids or instance ids) as ``(H, W)``.

    Returns
    -------
    ndarray, shape (H, W), unsigned or signed integer dtype
        Non-negative integer labels, 0 = background.

    Raises
    ------
    ImageFileError
        Unreadable file; more than one channel (RGB masks); non-integral float values;
        negative labels; unsupported dtype.
    """
    path = Path(path)
    raw = _read_raw(path, mask=True)
    if raw.ndim == 3 and 1 in (raw.shape[0], raw.shape[-1]):
        raw = raw.reshape(raw.shape[1:] if raw.shape[0] == 1 else raw.shape[:-1])
    if raw.ndim != 2:
        raise ImageFileError(
            path,
            f"a mask must be a single-channel label image (H, W), got shape {raw.shape} "
            "(RGB/colour masks are not supported: store class or instance ids as integers)",
        )
    if raw.dtype == bool:
        return raw.astype(np.uint8)
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all() or not np.array_equal(raw, np.round(raw)):
            raise ImageFileError(
                path, f"mask has non-integral {raw.dtype} values; labels must be integers"
            )
        if raw.size and raw.min() < 0:
            raise ImageFileError(path, f"mask has negative labels (min {raw.min():g})")
        return raw.astype(smallest_label_dtype(int(raw.max()) if raw.size else 0))
    if raw.dtype.name not in MASK_DTYPES:
        raise ImageFileError(path, f"unsupported mask dtype {raw.dtype}; masks need integer labels")
    if raw.dtype.kind == "i" and raw.size and raw.min() < 0:
        raise ImageFileError(path, f"mask has negative labels (min {raw.min()})")
    return raw


def write_tiff(path: str | os.PathLike, array: np.ndarray, **options) -> Path:
    """Write ``array`` as a TIFF atomically (:func:`scarce.atomic.atomic_output`).

    Parameters
    ----------
    path : path-like
        The final file; a killed or failed write leaves the previous one (or none).
    array : ndarray
        Any shape and dtype tifffile writes.
    **options
        Passed to ``tifffile.imwrite`` (e.g. ``compression="zlib"``, ``photometric``).

    Raises
    ------
    scarce.errors.WriteError
        If the disk is full or read-only (names the path and the space needed).
    """
    with atomic.atomic_output(path, needed=np.asarray(array).nbytes) as tmp:
        tifffile.imwrite(tmp, array, **options)
    return Path(path)


def tiff_metadata(array: np.ndarray, axes: str, pixel_size_um: float | None) -> dict:
    """``tifffile.imwrite`` keywords that record axes and pixel size (Fiji shows micrometres).

    ImageJ hyperstack metadata (``axes``, ``unit: um``, X/Y resolution in pixels per
    micrometre) for the dtypes ImageJ reads (uint8, uint16, float32); OME-XML
    (``PhysicalSizeX/Y`` in micrometres, plus X/Y resolution per centimetre) for the others
    (e.g. uint32 instance labels).

    Parameters
    ----------
    array : ndarray
        What will be written (its dtype picks the flavour).
    axes : {"YX", "CYX"}
        Axis order of ``array``.
    pixel_size_um : float or None
        Micrometres per pixel; ``None`` records the axes only.
    """
    if array.dtype in (np.uint8, np.uint16, np.float32):
        meta: dict = {"axes": axes}
        options: dict = {"imagej": True, "metadata": meta}
        if pixel_size_um:
            meta["unit"] = "um"
            options["resolution"] = (1.0 / pixel_size_um, 1.0 / pixel_size_um)
        return options
    meta = {"axes": axes}
    if pixel_size_um:
        meta.update(
            PhysicalSizeX=pixel_size_um,
            PhysicalSizeY=pixel_size_um,
            PhysicalSizeXUnit="µm",
            PhysicalSizeYUnit="µm",
        )
        per_cm = 1e4 / pixel_size_um  # baseline TIFF tags too, for readers without OME
        return {
            "ome": True,
            "metadata": meta,
            "resolution": (per_cm, per_cm),
            "resolutionunit": "CENTIMETER",
        }
    return {"ome": True, "metadata": meta}


def write_label_image(
    path: str | os.PathLike, labels: np.ndarray, *, pixel_size_um: float | None = None
) -> Path:
    """Write a class map or instance labels ``(H, W)`` in the smallest unsigned dtype.

    The format follows the suffix: ``.tif``/``.tiff`` (tifffile, zlib-compressed, axes ``YX``
    and the pixel size recorded: see :func:`tiff_metadata`) or ``.png`` (8 or 16 bit; labels
    above 65535 need TIFF). Written to a temp file, then renamed.

    Parameters
    ----------
    path : path-like
    labels : ndarray, shape (H, W), integer
    pixel_size_um : float, optional
        Micrometres per pixel, stored in TIFF files.

    Raises
    ------
    ValueError
        For a non-2D array, negative labels, or labels too large for PNG.
    scarce.errors.WriteError
        If the disk is full or read-only (names the path and the space needed).
    """
    path = Path(path)
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    max_value = int(labels.max()) if labels.size else 0
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    out = labels.astype(smallest_label_dtype(max_value), copy=False)
    if path.suffix.lower() in (".tif", ".tiff"):
        return write_tiff(path, out, compression="zlib", **tiff_metadata(out, "YX", pixel_size_um))
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: unsupported label format {path.suffix!r} (use .tif or .png)")
    if max_value > 65535:
        raise ValueError(f"{path}: labels up to {max_value} do not fit a PNG; use .tif")
    with atomic.atomic_output(path, needed=out.nbytes) as tmp:
        iio.imwrite(tmp, out)
    return path


def write_float_image(
    path: str | os.PathLike, array: np.ndarray, *, pixel_size_um: float | None = None
) -> Path:
    """Write float32 ``(C, H, W)`` (e.g. probabilities, axes ``CYX``) or ``(H, W)`` as TIFF.

    ImageJ metadata records the axes (channels, not a plain stack) and, if given, the pixel
    size in micrometres. Written atomically (:func:`write_tiff`).

    Raises
    ------
    scarce.errors.WriteError
        If the disk is full or read-only.
    """
    array = np.asarray(array, dtype=np.float32)
    options = tiff_metadata(array, "CYX" if array.ndim == 3 else "YX", pixel_size_um)
    return write_tiff(path, array, compression="zlib", **options)

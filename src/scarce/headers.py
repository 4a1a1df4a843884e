"""What an image file claims before it is decoded: format, shape, samples; the pixel limit.

A file from a microscope, a colleague or the internet may be empty, truncated, misnamed, a
dangling or looping symbolic link, or crafted to claim 100,000 x 100,000 pixels so that decoding
it exhausts the memory. :func:`check_file` looks at the path and the first bytes (magic number)
before any decoder runs; :func:`tiff_header` and :func:`pillow_header` read the claimed shape
from an opened file without decoding pixels; :func:`check_shape` refuses more than
:func:`max_pixels` pixels (default :data:`DEFAULT_MAX_PIXELS` = 2**31, generous for microscopy:
a 46,000 x 46,000 slide) or more than :data:`MAX_CHANNELS` samples per pixel. Each error is an
:class:`~scarce.errors.ImageFileError` naming the file and saying how to fix it.

The limit is set by :func:`set_max_pixels`, the ``SCARCE_MAX_PIXELS`` environment variable or
``scarce --max-pixels N``. Pillow's own decompression-bomb check (about 179 million pixels) is
replaced by this one while Scarce opens a file, so genuine large images up to the limit load.

References
----------
TIFF 6.0 and BigTIFF headers (``II*``/``MM*``, ``II+``); PNG IHDR; JPEG SOI; BMP ``BM``;
Pillow ``Image.MAX_IMAGE_PIXELS`` (the decompression-bomb guard this replaces).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from scarce.errors import ImageFileError

DEFAULT_MAX_PIXELS = 2**31
MAX_CHANNELS = 16  # most samples per pixel; an axis this short (or shorter) is a channel axis
ENV_VAR = "SCARCE_MAX_PIXELS"
MAGIC = {
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"II+\x00": "TIFF",  # BigTIFF
    b"MM\x00+": "TIFF",
    b"\x89PNG": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"BM": "BMP",
}
SUFFIX_FORMAT = {
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".bmp": "BMP",
}
_limit: int | None = None
_pillow_lock = threading.Lock()


def max_pixels() -> int:
    """The pixel limit now in force: :func:`set_max_pixels`, else ``$SCARCE_MAX_PIXELS``,
    else :data:`DEFAULT_MAX_PIXELS`."""
    if _limit is not None:
        return _limit
    text = os.environ.get(ENV_VAR, "")
    return int(text) if text.strip().isdigit() else DEFAULT_MAX_PIXELS


def set_max_pixels(limit: int | None) -> None:
    """Set the pixel limit for this process; ``None`` goes back to the default.

    Parameters
    ----------
    limit : int or None
        Largest number of pixels (H x W, times pages or slices) a file may claim, >= 1.

    Raises
    ------
    ValueError
        If ``limit`` is below 1.
    """
    global _limit
    if limit is not None and limit < 1:
        raise ValueError(f"the pixel limit must be >= 1, got {limit}")
    _limit = limit


@dataclass(frozen=True)
class Header:
    """What a file claims: its format and the shape of the array a decoder would return."""

    format: str  # "TIFF", "PNG", "JPEG" or "BMP"
    shape: tuple[int, ...]  # e.g. (H, W), (H, W, S), (Z, H, W)
    samples: int  # samples (colour channels) per pixel stored interleaved


def check_file(path: str | os.PathLike) -> str:
    """Refuse what no decoder should see; return the format the first bytes announce.

    Parameters
    ----------
    path : path-like
        A TIFF, PNG, JPEG or BMP file.

    Returns
    -------
    str
        ``"TIFF"``, ``"PNG"``, ``"JPEG"`` or ``"BMP"``.

    Raises
    ------
    ImageFileError
        For a symbolic link loop or a dangling link, a missing file or a folder, an empty file,
        contents in no supported format, or contents of another format than the suffix says.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageFileError(path, "symbolic link loop; point the link at a file") from exc
        if path.is_symlink():
            target = os.readlink(path)
            raise ImageFileError(path, f"broken symbolic link (target {target} missing)") from exc
        raise ImageFileError(path, f"cannot be opened ({exc.strerror})") from exc
    if not path.is_file():
        raise ImageFileError(path, "not a file")
    if size == 0:
        raise ImageFileError(path, "unreadable: empty file (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(8)
    found = next((fmt for magic, fmt in MAGIC.items() if head.startswith(magic)), None)
    named = SUFFIX_FORMAT.get(path.suffix.lower())
    if found is None:
        raise ImageFileError(
            path, f"unreadable: not a TIFF, PNG, JPEG or BMP file (it starts with {head[:8]!r})"
        )
    if named is not None and found != named:
        raise ImageFileError(
            path,
            f"the file holds a {found} image but its name ends in {path.suffix}; "
            f"rename it with the suffix of its format",
        )
    return found


def tiff_header(tif) -> Header:
    """The shape of the first series of an open ``tifffile.TiffFile``, without decoding it."""
    series = tif.series[0]
    shape = tuple(int(n) for n in series.shape)
    axes = series.axes
    return Header("TIFF", shape, shape[axes.index("S")] if "S" in axes else 1)


def pillow_header(image: Image.Image) -> Header:
    """The shape of an image opened (lazily) by Pillow, without decoding it."""
    width, height = image.size
    bands = len(image.getbands())
    shape = (height, width) if bands == 1 else (height, width, bands)
    return Header(image.format or "?", shape, bands)


@contextlib.contextmanager
def open_pillow(path: str | os.PathLike):
    """``PIL.Image.open`` with Pillow's decompression-bomb check off (:func:`check_shape`
    applies Scarce's limit instead); yields the lazily opened image, closed afterwards."""
    with _pillow_lock:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    with image:
        yield image


def check_shape(path: str | os.PathLike, header: Header, *, slices: bool = False) -> None:
    """Refuse a claimed shape above the pixel limit or with too many samples per pixel.

    Parameters
    ----------
    path : path-like
        Named in the error.
    header : Header
        From :func:`tiff_header`, :func:`pillow_header`, or built from an array's metadata
        (zarr, HDF5).
    slices : bool
        Word the message for a stack (whose count includes every slice).

    Raises
    ------
    ImageFileError
        Pixels (the product of all axes but the samples) above :func:`max_pixels`, an axis of
        length 0, or more than :data:`MAX_CHANNELS` samples per pixel.
    """
    shape, limit = header.shape, max_pixels()
    if any(n <= 0 for n in shape):
        raise ImageFileError(path, f"the header claims an empty image (shape {shape})")
    if header.samples > MAX_CHANNELS:
        raise ImageFileError(
            path,
            f"the header claims {header.samples} samples per pixel; at most {MAX_CHANNELS} "
            "channels are supported",
        )
    pixels = math.prod(shape) // max(header.samples, 1)
    if pixels > limit:
        what = "voxels in the stack" if slices else "pixels"
        raise ImageFileError(
            path,
            f"the header claims {pixels:,} {what} (shape {shape}), more than the limit of "
            f"{limit:,}; nothing was decoded. If the file is genuine, raise the limit with "
            f"--max-pixels N (or {ENV_VAR}=N)",
        )


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ENV_VAR",
    "Header",
    "MAX_CHANNELS",
    "check_file",
    "check_shape",
    "max_pixels",
    "open_pillow",
    "pillow_header",
    "set_max_pixels",
    "tiff_header",
]

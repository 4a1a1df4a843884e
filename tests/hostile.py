"""Builders of hostile and broken inputs, shared by the bad-input corpus and the fuzz tests.

Each builder writes real bytes the way a damaged disk, a careless colleague or an attacker
would: files that claim huge sizes in their headers (TIFF, PNG, JPEG, BMP), truncated and
misnamed files, symbolic link loops.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image


def image_bytes(fmt: str, array: np.ndarray | None = None) -> bytes:
    """A small valid image file (PNG, JPEG, BMP or TIFF) as bytes."""
    if array is None:
        array = (np.arange(32 * 32, dtype=np.uint32) % 251).astype(np.uint8).reshape(32, 32)
    buffer = io.BytesIO()
    if fmt == "TIFF":
        tifffile.imwrite(buffer, array)
    else:
        Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (CRC fixed, pixel data of 32 x 32)."""
    data = bytearray(image_bytes("PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A JPEG whose SOF0 segment claims ``width`` x ``height`` (at most 65535 each)."""
    data = bytearray(image_bytes("JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    """A BMP whose info header claims ``width`` x ``height``."""
    data = bytearray(image_bytes("BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def tiff_claiming(width: int, height: int, samples: int = 1, bits: int = 8) -> bytes:
    """A minimal little-endian TIFF whose first IFD claims this shape (16 bytes of pixels)."""
    entries = [
        (256, 4, width),  # ImageWidth, LONG
        (257, 4, height),  # ImageLength
        (258, 3, bits),  # BitsPerSample, SHORT
        (259, 3, 1),  # Compression: none
        (262, 3, 1),  # Photometric: min-is-black
        (273, 4, 8),  # StripOffsets
        (277, 3, samples),  # SamplesPerPixel
        (278, 4, height),  # RowsPerStrip
        (279, 4, 16),  # StripByteCounts
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        packed = struct.pack("<I", value) if kind == 4 else struct.pack("<HH", value, 0)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 24) + bytes(16) + ifd + struct.pack("<I", 0)


def write(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` (parents created) and return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def truncated(source: Path, path: Path, fraction: float = 0.5) -> Path:
    """The first ``fraction`` of ``source``'s bytes, written to ``path``."""
    data = Path(source).read_bytes()
    return write(path, data[: max(1, int(len(data) * fraction))])


def symlink_loop(path: Path) -> Path:
    """``path`` -> ``path.loop`` -> ``path``: a loop no ``stat`` resolves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    other = path.with_name(path.name + ".loop")
    path.symlink_to(other.name)
    other.symlink_to(path.name)
    return path


def failing_open(code: int = errno.ENOSPC):
    """An ``open`` replacement whose files store half of each write, then fail with ``code``
    (``ENOSPC``: the disk is full), as a file system does when it runs out of blocks."""

    class Failing:
        def __init__(self, path, mode):
            self.fh = open(path, mode)  # noqa: SIM115 - closed in __exit__

        def write(self, data):
            self.fh.write(bytes(data)[: len(data) // 2])
            raise OSError(code, os.strerror(code))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    return Failing

"""LMDB storage of samples: one record per sample plus one metadata record.

Layout of a database (an LMDB environment directory, e.g. ``DB_DIR/train.lmdb``):

- key ``b"__metadata__"``: UTF-8 JSON, the metadata record (see ``scarce.ingest``);
- keys ``b"%08d" % i`` for ``i`` in ``0..num_samples-1``: one sample each.

A sample record is ``[4-byte little-endian header length][JSON header][image bytes][mask bytes]``.
The header holds ``name`` (unique sample name), ``source`` (stem of the source image),
``origin`` ``[y, x]`` of the tile in the source image (pixels), ``image`` and ``mask``
(``shape``, ``dtype``, ``offset``, ``nbytes``) and ``classes`` (label values present; for
instance masks the classes 0/1 = background/foreground present). Arrays are decoded with
``np.frombuffer`` straight on the LMDB buffer: no copy is made.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

FORMAT_VERSION = 1
METADATA_KEY = b"__metadata__"
_HEADER = struct.Struct("<I")


class StoreError(ValueError):
    """A database is missing, unreadable, or not a Scarce database (message names the path)."""


@dataclass(frozen=True)
class Sample:
    """One sample read from a database.

    Attributes
    ----------
    name : str
        Unique sample name (``stem`` or ``stem@y,x`` for tiles).
    source : str
        Stem of the source image; all tiles of one image share it.
    origin : tuple of int
        ``(y, x)`` of the sample's top-left pixel in the source image, pixels.
    image : ndarray, shape (C, H, W)
        Stored dtype (uint8, uint16, int16, int32, uint32 or float32). Read-only; it may be a
        view on the LMDB buffer, valid only while its transaction is open unless copied.
    mask : ndarray, shape (H, W)
        Integer labels (class ids or instance ids), read-only.
    classes : tuple of int
        Label values present (for instance masks: 0 and/or 1).
    """

    name: str
    source: str
    origin: tuple[int, int]
    image: np.ndarray
    mask: np.ndarray
    classes: tuple[int, ...]


def sample_key(index: int) -> bytes:
    """LMDB key of sample ``index``."""
    return b"%08d" % index


def encode_sample(
    name: str,
    source: str,
    origin: tuple[int, int],
    image: np.ndarray,
    mask: np.ndarray,
    classes: list[int],
) -> bytes:
    """Serialise one sample to a record (see the module docstring for the layout).

    Parameters
    ----------
    image : ndarray, shape (C, H, W)
    mask : ndarray, shape (H, W)
        Same H and W as ``image``.

    Raises
    ------
    ValueError
        If the shapes disagree.
    """
    if image.ndim != 3 or mask.ndim != 2 or image.shape[1:] != mask.shape:
        raise ValueError(f"{name}: image {image.shape} and mask {mask.shape} do not match")
    image = np.ascontiguousarray(image)
    mask = np.ascontiguousarray(mask)
    header = {
        "name": name,
        "source": source,
        "origin": [int(origin[0]), int(origin[1])],
        "classes": [int(c) for c in classes],
        "image": {"shape": list(image.shape), "dtype": image.dtype.str, "offset": 0,
                  "nbytes": image.nbytes},
        "mask": {"shape": list(mask.shape), "dtype": mask.dtype.str, "offset": image.nbytes,
                 "nbytes": mask.nbytes},
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((_HEADER.pack(len(head)), head, image.data.cast("B"), mask.data.cast("B")))


def decode_sample(buffer) -> Sample:
    """Decode a record without copying the pixel data.

    Parameters
    ----------
    buffer : bytes or memoryview
        The record as returned by LMDB (``buffers=True`` gives a memoryview: zero copy).
    """
    (head_len,) = _HEADER.unpack_from(buffer, 0)
    start = _HEADER.size + head_len
    header = json.loads(bytes(buffer[_HEADER.size:start]))

    def array(spec):
        count = int(np.prod(spec["shape"]))
        arr = np.frombuffer(buffer, dtype=np.dtype(spec["dtype"]), count=count,
                            offset=start + spec["offset"])
        return arr.reshape(spec["shape"])

    return Sample(
        name=header["name"],
        source=header["source"],
        origin=tuple(header["origin"]),
        image=array(header["image"]),
        mask=array(header["mask"]),
        classes=tuple(header["classes"]),
    )


def open_env(path: str | os.PathLike, *, write: bool = False, map_size: int = 1 << 40):
    """Open an LMDB environment directory.

    Reading opens read-only, without locking and without read-ahead (suited to many reader
    processes drawing random samples). Writing uses a large sparse ``map_size`` (bytes).

    Raises
    ------
    StoreError
        If reading and ``path`` is not an LMDB directory.
    """
    path = Path(path)
    if write:
        path.mkdir(parents=True, exist_ok=True)
        return lmdb.open(str(path), map_size=map_size, subdir=True, sync=False,
                         writemap=False, meminit=False, map_async=True)
    if not (path / "data.mdb").is_file():
        raise StoreError(f"{path} is not an LMDB database (no data.mdb inside); "
                         "make one with `scarce ingest`")
    return lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True,
                     max_readers=512)


def read_metadata(env_or_path) -> dict:
    """The metadata record of a database (an open environment or its path).

    Raises
    ------
    StoreError
        If the record is missing or its format version is newer than this Scarce understands.
    """
    env = open_env(env_or_path) if isinstance(env_or_path, str | os.PathLike) else env_or_path
    try:
        with env.begin() as txn:
            raw = txn.get(METADATA_KEY)
    finally:
        if env is not env_or_path:
            env.close()
    if raw is None:
        raise StoreError(f"{env_or_path}: no metadata record; not a Scarce database")
    meta = json.loads(bytes(raw))
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise StoreError(f"{env_or_path}: format version {meta['format_version']} is newer "
                         f"than this Scarce ({FORMAT_VERSION}); upgrade Scarce")
    return meta


class SampleStore:
    """Random read access to one database; open it in the process that reads it.

    LMDB environments must not cross a ``fork``: readers open their own store in each worker.

    Parameters
    ----------
    path : path-like
        The LMDB directory (e.g. ``DB/train.lmdb``).

    Examples
    --------
    >>> store = SampleStore("db/train.lmdb")              # doctest: +SKIP
    >>> sample = store[0]; sample.image.shape             # doctest: +SKIP
    (1, 256, 256)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.env = open_env(self.path)
        self.metadata = read_metadata(self.env)
        self.num_samples = int(self.metadata["num_samples"])

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        """Sample ``index`` with its arrays copied out of LMDB (safe after the call)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range 0..{self.num_samples - 1}")
        with self.env.begin(buffers=True) as txn:
            sample = decode_sample(txn.get(sample_key(index)))
            return Sample(sample.name, sample.source, sample.origin, sample.image.copy(),
                          sample.mask.copy(), sample.classes)

    def read_raw(self, index: int) -> bytes:
        """The undecoded record of sample ``index`` (for benchmarks of raw read speed)."""
        with self.env.begin() as txn:
            return txn.get(sample_key(index))

    def close(self) -> None:
        """Close the LMDB environment."""
        self.env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

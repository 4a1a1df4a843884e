"""LMDB storage of samples: one record per sample plus one metadata record.

Layout of a database (an LMDB environment directory, e.g. ``DB_DIR/train.lmdb``):

- key ``b"__metadata__"``: UTF-8 JSON, the metadata record (keys listed in
  :mod:`scarce.data.ingest` for image/mask databases);
- keys ``b"%08d" % i`` for ``i`` in ``0..num_samples-1``: one sample each.

A sample record (format version 2) is ``[4-byte little-endian header length][JSON header]``
followed by the bytes of its named arrays. The header holds ``name`` (unique sample name),
``source`` (stem of the source image or name of the source stack), ``origin`` ``[y, x]`` of the
sample in its source (pixels), ``classes`` (label values present; for instance masks 0/1 =
background/foreground), ``info`` (plain values a task adds, e.g. ``{"z": 4}`` for a stack
slice), ``arrays``: name -> ``shape``, ``dtype``, ``offset``, ``nbytes``, and ``crc32``: the
CRC-32 of the array bytes, checked on every read (records written before it was added have
none and are read unchecked), so a damaged page never reaches training silently. Image/mask
databases store ``image`` ``(C, H, W)`` and ``mask`` ``(H, W)``; stack databases ``image``
``(1, H, W)`` and optionally ``mask``. Version-1 records (``image`` and ``mask`` at the top of
the header) still decode. Arrays are decoded with ``np.frombuffer`` straight on the LMDB
buffer: no copy is made.

:func:`scarce.data.install.install_folder` is the one way a database folder comes into place;
:mod:`scarce.data.inspect` summarises databases from their metadata records.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np

from scarce import atomic
from scarce.errors import StoreError, WriteError

FORMAT_VERSION = 2  # 2: named arrays per record; 1: image + mask only (still read)
METADATA_KEY = b"__metadata__"
_HEADER = struct.Struct("<I")


@dataclass(frozen=True)
class Sample:
    """One sample read from a database.

    Attributes
    ----------
    name : str
        Unique sample name (``stem`` or ``stem@y,x`` for tiles, ``stack@z`` for slices).
    source : str
        Stem of the source image (all tiles of one image share it) or name of the stack.
    origin : tuple of int
        ``(y, x)`` of the sample's top-left pixel in its source, pixels.
    arrays : dict of str to ndarray
        The named arrays, e.g. ``image`` ``(C, H, W)`` in the stored dtype and ``mask``
        ``(H, W)`` integer labels. Read-only; they may be views on the LMDB buffer, valid only
        while its transaction is open unless copied.
    classes : tuple of int
        Label values present (for instance masks: 0 and/or 1).
    info : dict
        Plain values the writer added (e.g. ``{"z": 4}``); empty for image/mask databases.
    """

    name: str
    source: str
    origin: tuple[int, int]
    arrays: dict[str, np.ndarray]
    classes: tuple[int, ...] = ()
    info: dict = field(default_factory=dict)

    @property
    def image(self) -> np.ndarray:
        """The ``image`` array ``(C, H, W)``."""
        return self.arrays["image"]

    @property
    def mask(self) -> np.ndarray | None:
        """The ``mask`` array ``(H, W)``, or ``None`` when the record has none."""
        return self.arrays.get("mask")


def sample_key(index: int) -> bytes:
    """LMDB key of sample ``index``."""
    return b"%08d" % index


def encode_sample(
    name: str,
    source: str,
    origin: tuple[int, int],
    arrays: Mapping[str, np.ndarray],
    classes=(),
    info: Mapping | None = None,
) -> bytes:
    """Serialise one sample to a record (see the module docstring for the layout).

    Parameters
    ----------
    name, source : str
        Sample name and source name.
    origin : tuple of int
        ``(y, x)`` in the source, pixels.
    arrays : mapping of str to ndarray
        Named arrays in the order they are stored; ``image`` ``(C, H, W)`` and ``mask``
        ``(H, W)`` must agree in H and W when both are present.
    classes : iterable of int
        Label values present.
    info : mapping, optional
        Plain JSON values stored in the header.

    Raises
    ------
    ValueError
        If there is no array, or ``image`` and ``mask`` do not match.
    """
    if not arrays:
        raise ValueError(f"{name}: a record needs at least one array")
    image, mask = arrays.get("image"), arrays.get("mask")
    if (
        image is not None
        and mask is not None
        and (image.ndim != 3 or mask.ndim != 2 or image.shape[1:] != mask.shape)
    ):
        raise ValueError(f"{name}: image {image.shape} and mask {mask.shape} do not match")
    specs, chunks, offset, crc = {}, [], 0, 0
    for key, value in arrays.items():
        value = np.ascontiguousarray(value)
        specs[key] = {
            "shape": list(value.shape),
            "dtype": value.dtype.str,
            "offset": offset,
            "nbytes": value.nbytes,
        }
        chunks.append(value.data.cast("B") if value.nbytes else b"")
        crc = zlib.crc32(chunks[-1], crc)
        offset += value.nbytes
    header = {
        "name": name,
        "source": source,
        "origin": [int(origin[0]), int(origin[1])],
        "classes": [int(c) for c in classes],
        "info": dict(info or {}),
        "arrays": specs,
        "crc32": crc,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((_HEADER.pack(len(head)), head, *chunks))


def decode_sample(buffer) -> Sample:
    """Decode a record (format 1 or 2) without copying the pixel data.

    Parameters
    ----------
    buffer : bytes or memoryview
        The record as returned by LMDB (``buffers=True`` gives a memoryview: zero copy).

    Raises
    ------
    ValueError
        If the array bytes do not match the record's CRC-32 (:func:`read_record` names the
        database); other damage raises what the decoder meets (struct, JSON, key errors).
    """
    (head_len,) = _HEADER.unpack_from(buffer, 0)
    start = _HEADER.size + head_len
    header = json.loads(bytes(buffer[_HEADER.size : start]))
    specs = header.get("arrays") or {k: header[k] for k in ("image", "mask")}  # format 1
    if "crc32" in header and zlib.crc32(memoryview(buffer)[start:]) != header["crc32"]:
        raise ValueError(f"record {header.get('name')!r}: checksum mismatch (damaged data)")

    def array(spec):
        count = int(np.prod(spec["shape"]))
        arr = np.frombuffer(
            buffer, dtype=np.dtype(spec["dtype"]), count=count, offset=start + spec["offset"]
        )
        return arr.reshape(spec["shape"])

    return Sample(
        name=header["name"],
        source=header["source"],
        origin=tuple(header["origin"]),
        arrays={key: array(spec) for key, spec in specs.items()},
        classes=tuple(header["classes"]),
        info=header.get("info", {}),
    )


_DAMAGE = (lmdb.Error, ValueError, KeyError, TypeError, IndexError, struct.error)


def read_record(txn, index: int, db_path) -> Sample:
    """Sample ``index`` of an open transaction, decoded (arrays are views on LMDB's buffer).

    Parameters
    ----------
    txn : lmdb.Transaction
        Opened with ``buffers=True`` for zero copy.
    index : int
        Sample index.
    db_path : path-like
        The database, named in errors.

    Raises
    ------
    StoreError
        If the record is missing, or LMDB or the decoder finds it damaged (bad page, bad
        header, checksum mismatch): names the database and the sample, and says to re-ingest.
    """
    try:
        raw = txn.get(sample_key(index))
        if raw is None:
            raise KeyError(f"no record for sample {index}")
        return decode_sample(raw)
    except _DAMAGE as exc:
        raise StoreError(f"{db_path}: sample {index}: {corrupt_advice(exc)}") from exc


def open_env(
    path: str | os.PathLike, *, write: bool = False, map_size: int = 1 << 40, writemap: bool = False
):
    """Open an LMDB environment directory.

    Reading opens read-only, without locking and without read-ahead (suited to many reader
    processes drawing random samples). Writing uses a large sparse ``map_size`` (bytes).

    Parameters
    ----------
    path : path-like
        The environment directory (created when writing).
    write : bool
        Open for writing (``sync=False``: call ``env.sync(True)`` or :func:`close_writer`).
    map_size : int
        Largest database size, bytes (writing only).
    writemap : bool
        Writing only: write records straight into the memory map instead of through
        ``malloc``'d pages and ``pwrite`` (measured 5-8x faster for large records). LMDB then
        sizes the data file to ``map_size``; its blocks are reserved at once
        (:func:`scarce.atomic.reserve_space`), because a write through the map on a full disk
        kills the process with SIGBUS. Where they cannot be reserved the environment is opened
        without ``writemap``. Pass a ``map_size`` near what will be written and close with
        :func:`close_writer`, which trims the file.

    Returns
    -------
    lmdb.Environment

    Raises
    ------
    StoreError
        If reading and ``path`` is not an LMDB directory, or LMDB refuses it (corrupt).
    scarce.errors.WriteError
        If writing and the disk has not ``map_size`` bytes free (or is read-only).

    References
    ----------
    LMDB, ``mdb_env_open`` flags ``MDB_WRITEMAP``, ``MDB_NOSYNC``, ``MDB_NORDAHEAD``:
    http://www.lmdb.tech/doc/group__mdb.html
    """
    path = Path(path)
    if write:
        return _open_writer(path, map_size, writemap)
    if not (path / "data.mdb").is_file():
        raise StoreError(
            f"{path} is not an LMDB database (no data.mdb inside); make one with `scarce ingest`"
        )
    try:
        return lmdb.open(
            str(path), readonly=True, lock=False, readahead=False, subdir=True, max_readers=512
        )
    except lmdb.Error as exc:
        raise StoreError(f"{path}: {corrupt_advice(exc)}") from exc


def corrupt_advice(exc: Exception) -> str:
    """The message for a database LMDB or the record decoder refuses (ends with the fix)."""
    return (
        f"the database is damaged or not an LMDB database ({type(exc).__name__}: {exc}); "
        "ingest it again (`scarce ingest ... --overwrite`)"
    )


def _open_writer(path: Path, map_size: int, writemap: bool):
    """A writing environment; with ``writemap`` only if the data file's blocks are reserved."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        env = _lmdb_writer(path, map_size, writemap)
        if writemap:
            try:
                reserved = atomic.reserve_space(path / "data.mdb", map_size)
            except BaseException:
                env.close()
                raise
            if not reserved:
                env.close()
                env = _lmdb_writer(path, map_size, False)
    except OSError as exc:
        if exc.errno in atomic.DISK_ERRNOS and not isinstance(exc, WriteError):
            raise atomic.write_error(path, exc, map_size) from exc
        raise
    return env


def _lmdb_writer(path: Path, map_size: int, writemap: bool):
    return lmdb.open(
        str(path),
        map_size=map_size,
        subdir=True,
        sync=False,
        writemap=writemap,
        meminit=False,
        map_async=True,
    )


def close_writer(env, *, sync: bool = True) -> int:
    """Flush and close a writing environment, then cut its data file to the pages in use.

    With ``writemap=True`` LMDB makes the data file as large as ``map_size``; the pages past
    ``last_pgno`` are unused, so cutting them gives the file a non-writemap writer would have
    left (and keeps copies of the database small: ``cp``/``tar`` need not know sparse files).

    Parameters
    ----------
    env : lmdb.Environment
        Opened with :func:`open_env` ``(write=True)``; no transaction may be open.
    sync : bool
        ``fsync`` the data before closing, so that a rename that follows is durable.

    Returns
    -------
    int
        Size of the data file, bytes.
    """
    data_file = Path(env.path()) / "data.mdb"
    used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    if sync:
        env.sync(True)
    env.close()
    if data_file.stat().st_size > used:
        os.truncate(data_file, used)
    return used


def read_metadata(env_or_path) -> dict:
    """The metadata record of a database (an open environment or its path).

    Raises
    ------
    StoreError
        If the record is missing or damaged, or its format version is newer than this Scarce
        understands.
    """
    env = open_env(env_or_path) if isinstance(env_or_path, str | os.PathLike) else env_or_path
    where = env_or_path if isinstance(env_or_path, str | os.PathLike) else env.path()
    try:
        with env.begin() as txn:
            raw = txn.get(METADATA_KEY)
        meta = None if raw is None else json.loads(bytes(raw))
    except _DAMAGE as exc:
        raise StoreError(f"{where}: metadata record: {corrupt_advice(exc)}") from exc
    finally:
        if env is not env_or_path:
            env.close()
    if meta is None:
        raise StoreError(f"{where}: no metadata record; not a Scarce database")
    if not isinstance(meta, dict):
        raise StoreError(f"{where}: metadata record is not a mapping; not a Scarce database")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise StoreError(
            f"{env_or_path}: format version {meta['format_version']} is newer "
            f"than this Scarce ({FORMAT_VERSION}); upgrade Scarce"
        )
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
            sample = read_record(txn, index, self.path)
            arrays = {key: value.copy() for key, value in sample.arrays.items()}
            return Sample(
                sample.name, sample.source, sample.origin, arrays, sample.classes, sample.info
            )

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

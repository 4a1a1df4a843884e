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

:func:`inspect_database` and :func:`format_inspection` summarise a database from its metadata
records alone (``scarce inspect``); the metadata keys are listed in :mod:`scarce.ingest`.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
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
        "image": {
            "shape": list(image.shape),
            "dtype": image.dtype.str,
            "offset": 0,
            "nbytes": image.nbytes,
        },
        "mask": {
            "shape": list(mask.shape),
            "dtype": mask.dtype.str,
            "offset": image.nbytes,
            "nbytes": mask.nbytes,
        },
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
    header = json.loads(bytes(buffer[_HEADER.size : start]))

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
        image=array(header["image"]),
        mask=array(header["mask"]),
        classes=tuple(header["classes"]),
    )


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
        sizes the data file to ``map_size`` (sparse), so pass a ``map_size`` near what will be
        written and close with :func:`close_writer`, which trims the file.

    Returns
    -------
    lmdb.Environment

    Raises
    ------
    StoreError
        If reading and ``path`` is not an LMDB directory.

    References
    ----------
    LMDB, ``mdb_env_open`` flags ``MDB_WRITEMAP``, ``MDB_NOSYNC``, ``MDB_NORDAHEAD``:
    http://www.lmdb.tech/doc/group__mdb.html
    """
    path = Path(path)
    if write:
        path.mkdir(parents=True, exist_ok=True)
        return lmdb.open(
            str(path),
            map_size=map_size,
            subdir=True,
            sync=False,
            writemap=writemap,
            meminit=False,
            map_async=True,
        )
    if not (path / "data.mdb").is_file():
        raise StoreError(
            f"{path} is not an LMDB database (no data.mdb inside); make one with `scarce ingest`"
        )
    return lmdb.open(
        str(path), readonly=True, lock=False, readahead=False, subdir=True, max_readers=512
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
            sample = decode_sample(txn.get(sample_key(index)))
            return Sample(
                sample.name,
                sample.source,
                sample.origin,
                sample.image.copy(),
                sample.mask.copy(),
                sample.classes,
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


def _describe(db: Path) -> dict:
    """Facts about one database from its metadata record (no sample is decoded)."""
    env = open_env(db)
    try:
        meta = read_metadata(env)
        entries = env.stat()["entries"]
    finally:
        env.close()
    shapes = Counter(f"{h}x{w}" for h, w in (s["shape"] for s in meta["samples"]))
    counts = {k: int(v) for k, v in meta["class_pixel_counts"].items()}
    total = sum(counts.values()) or 1
    keys = (
        "split",
        "num_samples",
        "channels",
        "image_dtype",
        "mask_dtype",
        "mask_kind",
        "class_ids",
        "class_pixel_counts",
        "num_instances",
        "intensity",
        "tiling",
        "class_names",
        "channel_names",
        "pixel_size_um",
        "description",
        "ignore_label",
        "source",
        "created",
        "format_version",
        "scarce_version",
    )
    info = {k: meta.get(k) for k in keys}
    info.update(
        path=str(db),
        num_sources=len(meta["sources"]),
        records=entries - 1,
        records_match=entries - 1 == meta["num_samples"],
        size_bytes=(db / "data.mdb").stat().st_size,
        class_fractions={k: v / total for k, v in counts.items()},
        shapes={
            "distinct": len(shapes),
            "most_common": shapes.most_common(5),
            "min": [min(s["shape"][i] for s in meta["samples"]) for i in (0, 1)]
            if meta["samples"]
            else None,
            "max": [max(s["shape"][i] for s in meta["samples"]) for i in (0, 1)]
            if meta["samples"]
            else None,
        },
    )
    return info


def inspect_database(path: str | os.PathLike) -> dict:
    """Summarise a database folder (``DB_DIR`` with ``train.lmdb``/``test.lmdb``) or one LMDB.

    Only metadata records are read, so this is fast on any size.

    Parameters
    ----------
    path : path-like
        ``DB_DIR`` as written by ``scarce ingest``, or one ``*.lmdb`` directory.

    Returns
    -------
    dict
        ``path``, ``split`` (the ``split.json`` contents or ``None``) and ``databases``: split
        name -> facts (``num_samples``, ``num_sources``, ``records``/``records_match`` (record
        count against the metadata), shapes ``(H, W)`` in pixels, dtypes, ``class_fractions``,
        ``intensity``, dataset metadata, ``size_bytes``, ...), JSON-serialisable.

    Raises
    ------
    StoreError
        If ``path`` holds no Scarce database.
    """
    path = Path(path)
    if (path / "data.mdb").is_file():
        dbs = {path.stem: path}
    else:
        dbs = {n: path / f"{n}.lmdb" for n in ("train", "test") if (path / f"{n}.lmdb").is_dir()}
    if not dbs:
        raise StoreError(
            f"{path}: no train.lmdb/test.lmdb inside and not an LMDB directory; "
            "pass the folder written by `scarce ingest`"
        )
    split_file = path / "split.json"
    split = json.loads(split_file.read_text()) if split_file.is_file() else None
    return {
        "path": str(path),
        "split": split,
        "databases": {name: _describe(db) for name, db in dbs.items()},
    }


def format_inspection(info: dict) -> str:
    """Human summary of :func:`inspect_database` output: one block per database."""
    lines = [f"Database {info['path']}"]
    if info["split"] is not None:
        lines.append(
            f"  split.json: {len(info['split']['train'])} train / "
            f"{len(info['split']['test'])} test source images"
        )
    for name, d in info["databases"].items():
        shapes = ", ".join(f"{s} ({n})" for s, n in d["shapes"]["most_common"])
        lines += [
            f"[{name}] {d['path']}  ({d['size_bytes'] / 1e6:.1f} MB)",
            f"  samples: {d['num_samples']} from {d['num_sources']} source image(s)"
            + ("" if d["records_match"] else f"  (WARNING: {d['records']} records found)"),
            f"  shapes (HxW, {d['shapes']['distinct']} distinct): {shapes}",
            f"  image: {d['channels']} channel(s) {d['image_dtype']};  mask: {d['mask_kind']} "
            f"{d['mask_dtype']}"
            + (f", {d['num_instances']} instances" if d["num_instances"] is not None else ""),
            "  classes: "
            + ", ".join(
                f"{c}{_name(d['class_names'], c)} {100 * f:.2f}%"
                for c, f in d["class_fractions"].items()
            ),
        ]
        for i, stat in enumerate(zip(*(d["intensity"][k] for k in ("mean", "std", "p1", "p99")))):
            lines.append(
                f"  channel {i}{_name(d['channel_names'], i)}: mean {stat[0]:.4g} "
                f"std {stat[1]:.4g} p1 {stat[2]:.4g} p99 {stat[3]:.4g}"
            )
        extra = {
            k: d[k]
            for k in ("tiling", "pixel_size_um", "description", "ignore_label")
            if d[k] is not None
        }
        lines += [f"  {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines)


def _name(names, index) -> str:
    index = int(index)
    return f" ({names[index]})" if names and 0 <= index < len(names) else ""

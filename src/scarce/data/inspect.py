"""Summaries of databases from their metadata records alone (``scarce inspect``).

:func:`inspect_database` reads a database folder written by ``scarce ingest`` (or
``ingest-stack``) or one LMDB directory; :func:`format_inspection` prints it for people.
No sample is decoded, so both are fast on any size. The metadata keys are listed in
:mod:`scarce.data.ingest`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from scarce.data.store import SampleStore, open_env, read_metadata
from scarce.errors import StoreError


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


def sample_images(db_path: str | os.PathLike, limit: int = 100):
    """Up to ``limit`` evenly spaced raw images of a database (in index order).

    Parameters
    ----------
    db_path : path-like
        LMDB directory.
    limit : int
        Most images yielded.

    Yields
    ------
    ndarray, shape (C, H, W)
        The stored image (its stored dtype), a copy.
    """
    with SampleStore(db_path) as store:
        count = len(store)
        picks = np.unique(np.linspace(0, count - 1, min(count, limit)).round().astype(int))
        for index in picks:
            yield store[int(index)].image

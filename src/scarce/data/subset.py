"""A database of some of another database's source images: records copied, metadata recomputed.

``scarce learning-curve`` trains on nested subsets of the training images; each subset is an
ordinary database, so its class counts and intensity statistics (``data.normalization:
dataset``) are those of the images it holds, as if nothing else had been annotated.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from scarce.data import install, store
from scarce.data.records import IntensityStats, label_counts
from scarce.errors import InputError


def _statistics(src_env, keys: list[int], meta: dict) -> tuple[dict, int | None, dict]:
    """Class pixel counts, the instance count and intensity statistics of some records.

    Overlapping tiles (``tile_stride < tile_size``) count their shared pixels twice.
    """
    counts: Counter = Counter()
    instances = 0
    pixels = sum(int(np.prod(meta["samples"][i]["shape"])) for i in keys)
    stats = IntensityStats(
        int(meta["channels"]), np.dtype(meta["image_dtype"]), pixels, np.random.default_rng(0)
    )
    with src_env.begin(buffers=True) as txn:
        for i in keys:
            sample = store.decode_sample(txn.get(store.sample_key(i)))
            stats.add(np.asarray(sample.image))
            labels, n = label_counts(np.asarray(sample.mask))
            if meta["mask_kind"] == "instance":
                fg = int(n[labels > 0].sum())
                counts.update({0: int(n.sum()) - fg, 1: fg})
                instances += int(np.count_nonzero(labels))
            else:
                counts.update(dict(zip(labels.tolist(), n.tolist())))
    kind = meta["mask_kind"] == "instance"
    return dict(sorted(counts.items())), instances if kind else None, stats.result()


def subset_database(src, dst, sources, *, overwrite: bool = False) -> dict:
    """Write ``dst``: the records of ``src`` whose source image is in ``sources``.

    Parameters
    ----------
    src : path-like
        An LMDB database written by ``scarce ingest`` (e.g. ``DB/train.lmdb``).
    dst : path-like
        The LMDB directory to create (installed atomically).
    sources : iterable of str
        Source image stems (``metadata["sources"]``) to keep.
    overwrite : bool
        Replace an existing ``dst``.

    Returns
    -------
    dict
        The new metadata record: ``src``'s, with the samples, ``sources``, ``num_samples``,
        class pixel counts, instance count, intensity statistics and byte count of the
        subset, and ``subset_of`` (``src`` and its number of sources).

    Raises
    ------
    InputError
        If a stem is not a source of ``src``, or ``sources`` is empty.
    scarce.errors.OutputExistsError
        If ``dst`` exists and ``overwrite`` is false.
    """
    src, wanted = Path(src), list(dict.fromkeys(sources))
    meta = store.read_metadata(src)
    unknown = sorted(set(wanted) - set(meta["sources"]))
    if unknown or not wanted:
        raise InputError(
            f"{src}: cannot take a subset of sources {unknown or '(none given)'}; its sources "
            f"are {', '.join(meta['sources'][:10])}{' ...' if len(meta['sources']) > 10 else ''}"
        )
    keep = set(wanted)
    keys = [i for i, e in enumerate(meta["samples"]) if e["source"] in keep]
    env = store.open_env(src)
    try:
        counts, instances, intensity = _statistics(env, keys, meta)
        new = dict(meta)
        new.update(
            num_samples=len(keys),
            samples=[meta["samples"][i] for i in keys],
            sources=[s for s in meta["sources"] if s in keep],
            source_files={s: f for s, f in meta.get("source_files", {}).items() if s in keep},
            channel_expanded=[s for s in meta.get("channel_expanded", []) if s in keep],
            class_pixel_counts={str(c): n for c, n in counts.items()},
            num_instances=instances,
            intensity=intensity,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            subset_of={"database": str(src.resolve()), "sources": len(meta["sources"])},
        )
        if meta.get("raw_bytes"):  # image + mask bytes scale with the pixels kept
            area = [int(np.prod(e["shape"])) for e in meta["samples"]]
            new["raw_bytes"] = int(meta["raw_bytes"] * sum(area[i] for i in keys) / sum(area))
        if meta["mask_kind"] != "instance":
            new["class_ids"] = [int(c) for c in counts]
        with install.install_folder(dst, overwrite=overwrite) as tmp:
            _copy_records(env, keys, tmp, new)
    finally:
        env.close()
    return new


def _copy_records(src_env, keys: list[int], out: Path, meta: dict) -> None:
    """Copy records ``keys`` of ``src_env`` to a new LMDB at ``out`` as 0..n-1, then ``meta``."""
    with src_env.begin() as txn:
        records = [txn.get(store.sample_key(i)) for i in keys]
    size = sum(len(r) for r in records)
    env = store.open_env(out, write=True, map_size=int(size * 1.5) + (64 << 20))
    try:
        with env.begin(write=True) as txn:
            for new_index, record in enumerate(records):
                txn.put(store.sample_key(new_index), record, append=True)
            txn.put(store.METADATA_KEY, json.dumps(meta, separators=(",", ":")).encode())
    finally:
        store.close_writer(env)


__all__ = ["subset_database"]

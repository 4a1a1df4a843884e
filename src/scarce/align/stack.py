"""Serial-section stacks: read them from any common layout, validate, ingest into LMDB.

A stack is ``(Z, H, W)``: a multi-page TIFF, a folder of 2-D images sorted by name, a zarr
array, or an HDF5 dataset (``file.h5`` reads the dataset ``main``, as SEAMLeSS stores stacks;
``file.h5:name`` another one; ``(N, Z, H, W)`` datasets hold N stacks). :func:`open_stack`
reads slices lazily; :func:`ingest_stack` validates every stack first (all problems at once,
each naming its file and slice, nothing written) and then writes ``DB/train.lmdb`` and
``DB/test.lmdb`` through :func:`scarce.data.install.install_folder`: one record per slice,
``image`` ``(1, H, W)`` in the stack's dtype (and ``mask`` ``(H, W)`` uint8 when defect masks
are given), ``info`` ``{"z": z}``. Several stacks combine into one database (SEAMLeSS's
``combine_h5``); training pairs never cross from one stack to the next.

Metadata record of a stack database (besides ``format_version``, ``split``, ``num_samples``,
``channels``, ``image_dtype``): ``kind`` = ``"stack"``, ``stacks`` (name, source, slices z,
shape), ``pairs`` (sample indices ``[source, target]`` of consecutive slices z+1 -> z within a
stack and split), ``missing_value`` (pixels equal to it are missing data), ``has_masks``,
``slice_stats`` (per slice: ``mean``/``std`` over valid pixels, ``p1``/``p99``,
``valid_fraction``) and ``samples`` (name, source, z, shape).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from scarce import __version__, headers, io
from scarce.data import install, store
from scarce.errors import IngestError, InputError

log = logging.getLogger(__name__)

STACK_DTYPES = ("uint8", "uint16", "int16", "int32", "uint32", "float32")
OUTPUT_NAMES = {"train.lmdb", "test.lmdb", "stack.json"}


@dataclass
class Stack:
    """A lazily read stack of 2-D slices.

    Attributes
    ----------
    name : str
        Unique name (file stem, plus ``[n]`` for one of several stacks in a dataset).
    source : str
        Where it came from (file or folder, with ``:dataset`` for HDF5).
    shape : tuple of int
        ``(Z, H, W)``.
    dtype : numpy.dtype
    files : list of pathlib.Path or None
        One file per slice for a folder stack (errors name them).
    """

    name: str
    source: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    _read: object  # callable z -> (H, W) array
    files: list | None = None

    def slice(self, z: int) -> np.ndarray:
        """Slice ``z`` as a ``(H, W)`` array in the stack's dtype."""
        return np.asarray(self._read(z))

    def __len__(self) -> int:
        return self.shape[0]


def _tiff(path: Path) -> list[Stack]:
    """A multi-page TIFF (or one page holding a (Z, H, W) series), read once."""
    headers.check_file(path)
    with tifffile.TiffFile(path) as tif:
        headers.check_shape(path, headers.tiff_header(tif), slices=True)
        data = np.asarray(tif.asarray())
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise io.ImageFileError(path, f"expected a (Z, H, W) stack, got shape {data.shape}")
    return [Stack(path.stem, str(path), tuple(data.shape), data.dtype, lambda z: data[z])]


def _folder(path: Path) -> list[Stack]:
    files = io.list_image_files(path)
    if not files:
        raise io.ImageFileError(path, "no 2-D images (TIFF, PNG, JPEG, BMP) in this folder")
    first = io.read_image(files[0])

    def read(z: int) -> np.ndarray:
        image = io.read_image(files[z])
        if image.shape[0] != 1:
            raise io.ImageFileError(files[z], f"slice has {image.shape[0]} channels, expected 1")
        return image[0]

    shape = (len(files), *first.shape[1:])
    return [Stack(path.name, str(path), shape, first.dtype, read, files)]


def _arrays(array, name: str, source: str) -> list[Stack]:
    shape = tuple(int(n) for n in array.shape)
    headers.check_shape(source, headers.Header("array", shape, 1), slices=True)
    if len(shape) == 3:
        return [Stack(name, source, shape, np.dtype(array.dtype), lambda z: array[z])]
    if len(shape) == 4:
        return [
            Stack(
                f"{name}[{n}]",
                f"{source}[{n}]",
                shape[1:],
                np.dtype(array.dtype),
                lambda z, n=n: array[n, z],
            )
            for n in range(shape[0])
        ]
    raise InputError(f"{source}: expected (Z, H, W) or (N, Z, H, W), got shape {shape}")


def _zarr(path: Path) -> list[Stack]:
    import zarr

    node = zarr.open(str(path), mode="r")
    if not hasattr(node, "shape"):  # a group: its "main" array, or its only array
        arrays = dict(node.arrays())
        key = "main" if "main" in arrays else (next(iter(arrays)) if len(arrays) == 1 else None)
        if key is None:
            raise InputError(f"{path}: a zarr group with arrays {sorted(arrays)}; name one")
        node = arrays[key]
    return _arrays(node, path.name.split(".")[0], str(path))


def _hdf5(path: Path, dataset: str) -> list[Stack]:
    import h5py

    handle = h5py.File(path, "r")
    if dataset not in handle:
        names = list(handle.keys())
        handle.close()
        raise InputError(f"{path}: no dataset {dataset!r} (has {names}); use FILE.h5:NAME")
    return _arrays(handle[dataset], path.stem, f"{path}:{dataset}")


def open_stack(spec: str | os.PathLike) -> list[Stack]:
    """The stack(s) at ``spec`` (see the module docstring for the layouts).

    Returns
    -------
    list of Stack
        One, or N for an ``(N, Z, H, W)`` HDF5/zarr dataset.

    Raises
    ------
    scarce.errors.MissingInputError
        If the path does not exist.
    scarce.errors.ImageFileError, scarce.errors.InputError
        If it cannot be read as a stack (names the file and the problem).
    """
    text = str(spec)
    path, _, dataset = text.partition(".h5:") if ".h5:" in text else (text, "", "")
    path = Path(path + ".h5") if dataset else Path(path)
    if not path.exists():
        raise io.MissingInputError(f"{path}: no such stack (file or folder)")
    suffix = path.suffix.lower()
    try:
        if path.is_dir() and suffix != ".zarr":
            return _folder(path)
        if suffix == ".zarr":
            return _zarr(path)
        if suffix in (".h5", ".hdf5", ".hdf"):
            return _hdf5(path, dataset or "main")
        if suffix in (".tif", ".tiff"):
            return _tiff(path)
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, InputError | io.ImageFileError):
            raise
        raise io.ImageFileError(path, f"cannot be read as a stack ({exc})") from exc
    raise InputError(
        f"{path}: unsupported stack format {suffix!r}; use a multi-page TIFF, a folder of "
        "images, a .zarr array or an .h5 dataset"
    )


def check_stack(stack: Stack) -> tuple[list[np.ndarray], list[str]]:
    """Read every slice of ``stack`` and list its problems (each naming the file and slice).

    Returns
    -------
    slices : list of ndarray
        ``(H, W)`` arrays (empty when a slice could not be read).
    problems : list of str
    """
    problems, slices = [], []
    if len(stack) < 2:
        problems.append(f"{stack.source}: {len(stack)} slice(s); a stack needs at least 2")
    if stack.dtype.name not in STACK_DTYPES and stack.dtype != np.float64:
        problems.append(f"{stack.source}: unsupported dtype {stack.dtype}")
    for z in range(len(stack)):
        where = f"{stack.files[z]}" if stack.files else f"{stack.source} slice {z}"
        try:
            image = stack.slice(z)
        except (OSError, ValueError) as exc:
            problems.append(f"{where}: unreadable ({exc})")
            continue
        if image.ndim != 2:
            problems.append(f"{where}: not a 2-D slice (shape {image.shape})")
        elif image.shape != stack.shape[1:]:
            problems.append(
                f"{where}: {image.shape[0]}x{image.shape[1]}, the first slice is "
                f"{stack.shape[1]}x{stack.shape[2]}; slices must share one size"
            )
        elif image.dtype != stack.dtype:
            problems.append(f"{where}: dtype {image.dtype}, the first slice is {stack.dtype}")
        elif image.dtype.kind == "f" and not np.isfinite(image).all():
            problems.append(f"{where}: {int((~np.isfinite(image)).sum())} NaN/inf pixel(s)")
        else:
            slices.append(image.astype(np.float32) if image.dtype == np.float64 else image)
    return slices, problems


def parse_slices(text: str | None, count: int) -> set[int]:
    """The slice indices of ``"a:b"`` (Python slice syntax, ``b`` exclusive) or ``"a,b,c"``."""
    if not text:
        return set()
    try:
        if ":" in text:
            lo, _, hi = text.partition(":")
            return set(range(count)[slice(int(lo) if lo else None, int(hi) if hi else None)])
        return {int(v) for v in text.split(",")} & set(range(count))
    except ValueError as exc:
        raise InputError(f"--test-slices {text!r}: expected START:STOP or a,b,c") from exc


def slice_stats(image: np.ndarray, valid: np.ndarray) -> dict:
    """Mean, std, 1st/99th percentile over the valid pixels of a slice, and the valid fraction."""
    values = image[valid].astype(np.float64)
    if values.size == 0:
        return {"mean": 0.0, "std": 1.0, "p1": 0.0, "p99": 0.0, "valid_fraction": 0.0}
    p1, p99 = np.percentile(values, (1, 99))
    return {
        "mean": float(values.mean()),
        "std": float(max(values.std(), 1e-6)),
        "p1": float(p1),
        "p99": float(p99),
        "valid_fraction": float(valid.mean()),
    }


def _encode_split(stacks, slices, masks, chosen, missing_value) -> tuple[list, dict]:
    """Records and metadata of one split: the slices of every stack whose z is in ``chosen``."""
    records, samples, stats, pairs = [], [], [], []
    for stack, images, stack_masks in zip(stacks, slices, masks):
        previous = None
        for z, image in enumerate(images):
            if z not in chosen:
                previous = None
                continue
            valid = np.ones(image.shape, bool) if missing_value is None else image != missing_value
            arrays = {"image": image[None]}
            if stack_masks is not None:
                arrays["mask"] = stack_masks[z].astype(np.uint8)
            name = f"{stack.name}@{z}"
            records.append(store.encode_sample(name, stack.name, (0, 0), arrays, info={"z": z}))
            index = len(samples)
            samples.append({"name": name, "source": stack.name, "z": z, "shape": list(image.shape)})
            stats.append(slice_stats(image, valid))
            if previous is not None:
                pairs.append([index, previous])  # source z -> target z - 1
            previous = index
    return records, {"samples": samples, "slice_stats": stats, "pairs": pairs}


def _write(db_path: Path, records: list[bytes], meta: dict) -> None:
    size = sum(len(r) for r in records)
    # records 2-4 KiB take a whole overflow page: 2x covers page rounding; 1 MiB the B-tree
    env = store.open_env(db_path, write=True, map_size=2 * size + (1 << 20), writemap=True)
    with env.begin(write=True) as txn:
        for i, record in enumerate(records):
            txn.put(store.sample_key(i), record, append=True)
        txn.put(store.METADATA_KEY, json.dumps(meta, separators=(",", ":")).encode())
    store.close_writer(env)


def ingest_stack(
    stacks,
    out_dir,
    *,
    test_slices: str | None = None,
    missing_value: float | None = None,
    masks=None,
    overwrite: bool = False,
) -> dict:
    """Validate stacks and write ``out_dir/train.lmdb`` (and ``test.lmdb``) for alignment.

    Parameters
    ----------
    stacks : path-like or list of path-like
        Stacks (see :func:`open_stack`); several combine into one database.
    out_dir : path-like
        Database folder to create (``DB``).
    test_slices : str, optional
        Slices of every stack held out for testing, e.g. ``"24:30"``; the rest train.
        Without it everything trains and no ``test.lmdb`` is written.
    missing_value : float, optional
        Pixels equal to this are missing data (never matched, never normalised).
    masks : path-like or list of path-like, optional
        Defect-mask stacks, one per stack, same shapes (0 = normal, > 0 = defect).
    overwrite : bool
        Replace an existing ``out_dir`` that holds only such a database.

    Returns
    -------
    dict
        ``out``, ``stacks`` (names), ``train``/``test`` (slices), ``train_pairs``/``test_pairs``.

    Raises
    ------
    scarce.errors.IngestError
        With every problem of every stack (each naming the file and slice); nothing written.
    scarce.errors.OutputExistsError
        If ``out_dir`` exists and may not be replaced.
    """
    specs = [stacks] if isinstance(stacks, str | os.PathLike) else list(stacks)
    mask_specs = (
        [] if masks is None else ([masks] if isinstance(masks, str | os.PathLike) else list(masks))
    )
    out_dir = Path(out_dir)
    install.check_output_folder(out_dir, overwrite=overwrite, replaceable=OUTPUT_NAMES)
    problems, opened, slices, mask_slices = [], [], [], []
    for spec in specs:
        try:
            opened += open_stack(spec)
        except (io.ImageFileError, InputError, io.MissingInputError) as exc:
            problems.append(str(exc))
    for stack in opened:
        images, found = check_stack(stack)
        problems += found
        slices.append(images)
    names = [s.name for s in opened]
    if len(set(names)) != len(names):
        problems.append(f"stacks share a name: {names}; rename the files")
    if mask_specs:
        mask_stacks = [m for spec in mask_specs for m in open_stack(spec)]
        if len(mask_stacks) != len(opened):
            problems.append(f"{len(mask_stacks)} mask stack(s) for {len(opened)} stack(s)")
        for stack, mask in zip(opened, mask_stacks):
            if mask.shape != stack.shape:
                problems.append(
                    f"{mask.source}: masks {mask.shape} do not match {stack.source} {stack.shape}"
                )
            mask_slices.append([mask.slice(z) for z in range(len(mask))])
    dtypes = {s.dtype.name for s in opened}
    if len(dtypes) > 1:
        problems.append(f"stacks have different dtypes {sorted(dtypes)}; convert them to one")
    if problems:
        raise IngestError(problems)
    count = max(len(s) for s in opened)
    test = parse_slices(test_slices, count)
    chosen = {"train": set(range(count)) - test, "test": test}
    summary = {"out": str(out_dir), "stacks": names}
    with install.install_folder(out_dir, overwrite=overwrite, replaceable=OUTPUT_NAMES) as tmp:
        for split, zs in chosen.items():
            if not zs:
                continue
            records, part = _encode_split(
                opened, slices, mask_slices or [None] * len(opened), zs, missing_value
            )
            meta = {
                "format_version": store.FORMAT_VERSION,
                "kind": "stack",
                "split": split,
                "num_samples": len(records),
                "channels": 1,
                "image_dtype": opened[0].dtype.name if opened[0].dtype != np.float64 else "float32",
                "missing_value": missing_value,
                "has_masks": bool(mask_slices),
                "stacks": [
                    {
                        "name": s.name,
                        "source": s.source,
                        "shape": list(s.shape),
                        "slices": sorted(z for z in zs if z < len(s)),
                    }
                    for s in opened
                ],
                "scarce_version": __version__,
                **part,
            }
            _write(tmp / f"{split}.lmdb", records, meta)
            summary[split], summary[f"{split}_pairs"] = len(records), len(part["pairs"])
        (tmp / "stack.json").write_text(
            json.dumps({"stacks": [s.source for s in opened], "test_slices": test_slices}, indent=1)
            + "\n"
        )
    log.info("ingested %d stack(s) into %s: %s", len(opened), out_dir, summary)
    return summary

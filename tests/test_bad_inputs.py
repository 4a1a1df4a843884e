"""The bad-input corpus: each hostile or broken input, the error it must give, nothing written.

Every case builds real files in a fresh folder, runs the public function a user would run
(read an image, ingest, load a config or checkpoint, read a database or a stack), and checks
that it raises the expected :class:`~scarce.errors.ScarceError` subclass, that the message names
the offending file (in one line, or one line per problem for an ingest), and that the folder
holds exactly what it held before: nothing written, nothing half-written. The number of cases
is reported in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from scarce import io
from scarce.align.stack import open_stack
from scarce.config import load_config
from scarce.data.ingest import ingest
from scarce.data.store import SampleStore
from scarce.engine.checkpoint import load_checkpoint, save_checkpoint
from scarce.errors import (
    CheckpointError,
    ConfigError,
    ImageFileError,
    IngestError,
    InputError,
    StoreError,
)
from tests import hostile

IMAGE = (np.arange(32 * 32, dtype=np.uint32) % 251).astype(np.uint8).reshape(32, 32)
MASK = (IMAGE > 120).astype(np.uint8)


@dataclass(frozen=True)
class Case:
    """One bad input: ``build(folder)`` writes it and returns ``(action, path it is in)``."""

    id: str
    build: Callable[[Path], tuple[Callable[[], object], Path]]
    error: type
    match: str


CASES: list[Case] = []


def case(id: str, error: type, match: str):
    """Register the decorated builder as a corpus case."""

    def register(build):
        CASES.append(Case(id, build, error, match))
        return build

    return register


def dataset(root: Path, n: int = 3, images=None, masks=None, ext: str = ".tif") -> Path:
    """``root/images`` and ``root/masks`` with ``n`` small valid pairs (overridable per stem)."""
    for i in range(n):
        stem = f"img{i}"
        image = (images or {}).get(stem, IMAGE)
        mask = (masks or {}).get(stem, MASK)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / "images" / f"{stem}{ext}", image)
        tifffile.imwrite(root / "masks" / f"{stem}.tif", mask)
    return root


def ingest_of(root: Path, **options) -> Callable[[], object]:
    """Ingesting ``root`` into ``root/db`` (which must never appear)."""
    return lambda: ingest(root / "images", root / "masks", root / "db", progress=False, **options)


def reading(path: Path, mask: bool = False):
    """Reading ``path`` as an image (or a mask); the action and the path it must name."""
    return (lambda: io.read_mask(path)) if mask else (lambda: io.read_image(path)), path


# ------------------------------------------------------------------------------ image files
for _fmt, _ext in (("TIFF", ".tif"), ("PNG", ".png"), ("JPEG", ".jpg"), ("BMP", ".bmp")):

    @case(f"empty{_ext}", ImageFileError, r"empty file \(0 bytes\)")
    def _empty(d, ext=_ext):
        return reading(hostile.write(d / f"empty{ext}", b""))

    @case(f"truncated{_ext}", ImageFileError, "unreadable or truncated")
    def _truncated(d, fmt=_fmt, ext=_ext):
        whole = hostile.write(d / "whole.bin", hostile.image_bytes(fmt))
        return reading(hostile.truncated(whole, d / f"half{ext}", 0.6))


@case("random-bytes.tif", ImageFileError, "not a TIFF, PNG, JPEG or BMP file")
def _random(d):
    return reading(hostile.write(d / "noise.tif", np.random.default_rng(0).bytes(4096)))


@case("text.png", ImageFileError, "not a TIFF, PNG, JPEG or BMP file")
def _text(d):
    return reading(hostile.write(d / "notes.png", b"this is not an image\n" * 10))


@case("png-named-tif", ImageFileError, "holds a PNG image but its name ends in .tif")
def _png_as_tif(d):
    return reading(hostile.write(d / "x.tif", hostile.image_bytes("PNG")))


@case("tif-named-png", ImageFileError, "holds a TIFF image but its name ends in .png")
def _tif_as_png(d):
    return reading(hostile.write(d / "x.png", hostile.image_bytes("TIFF")))


@case("jpeg-mask-named-png", ImageFileError, "holds a JPEG image but its name ends in .png")
def _jpeg_as_png(d):  # a lossy mask in disguise
    return reading(hostile.write(d / "mask.png", hostile.image_bytes("JPEG")), mask=True)


@case("bmp-named-jpg", ImageFileError, "holds a BMP image but its name ends in .jpg")
def _bmp_as_jpg(d):
    return reading(hostile.write(d / "x.jpg", hostile.image_bytes("BMP")))


for _name, _data in (
    ("png-100000x100000", lambda: hostile.png_claiming(100_000, 100_000)),
    ("tiff-100000x100000", lambda: hostile.tiff_claiming(100_000, 100_000)),
    ("jpeg-65535x65535", lambda: hostile.jpeg_claiming(65_535, 65_535)),
    ("bmp-100000x100000", lambda: hostile.bmp_claiming(100_000, 100_000)),
):

    @case(_name, ImageFileError, r"more than the limit of 2,147,483,648; nothing was decoded")
    def _claims(d, name=_name, data=_data):
        ext = {"png": ".png", "tiff": ".tif", "jpeg": ".jpg", "bmp": ".bmp"}[name.split("-")[0]]
        return reading(hostile.write(d / f"bomb{ext}", data()))


@case("tiff-5000-samples", ImageFileError, "claims 5000 samples per pixel; at most 16")
def _samples(d):
    return reading(hostile.write(d / "wide.tif", hostile.tiff_claiming(64, 64, samples=5000)))


@case("tiff-no-channel-axis", ImageFileError, "cannot tell the channel axis")
def _no_channel_axis(d):
    path = d / "cube.tif"
    tifffile.imwrite(path, np.zeros((40, 64, 64), np.uint8), photometric="minisblack")
    return reading(path)


@case("tiff-4d", ImageFileError, "expected a 2D image")
def _four_d(d):
    path = d / "4d.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 20, 20), np.uint8), photometric="minisblack")
    return reading(path)


@case("symlink-loop", ImageFileError, "symbolic link loop")
def _loop(d):
    return reading(hostile.symlink_loop(d / "loop.tif"))


@case("dangling-symlink", ImageFileError, r"broken symbolic link \(target gone.tif missing\)")
def _dangling(d):
    (d / "link.tif").symlink_to("gone.tif")
    return reading(d / "link.tif")


@case("folder-named-tif", ImageFileError, "not a file")
def _folder(d):
    (d / "folder.tif").mkdir()
    return reading(d / "folder.tif")


@case("nan-pixels", ImageFileError, "NaN/inf pixel")
def _nan(d):
    path = d / "nan.tif"
    tifffile.imwrite(path, np.full((8, 8), np.nan, np.float32))
    return reading(path)


@case("complex-dtype", ImageFileError, "unsupported image dtype complex64")
def _complex(d):
    path = d / "complex.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.complex64))
    return reading(path)


@case("rgb-mask", ImageFileError, "a mask must be a single-channel label image")
def _rgb_mask(d):
    path = d / "rgb.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return reading(path, mask=True)


@case("negative-mask", ImageFileError, r"negative labels \(min -3\)")
def _negative(d):
    path = d / "neg.tif"
    tifffile.imwrite(path, np.full((8, 8), -3, np.int16))
    return reading(path, mask=True)


@case("fractional-mask", ImageFileError, "non-integral float32 values")
def _fractional(d):
    path = d / "frac.tif"
    tifffile.imwrite(path, np.full((8, 8), 0.5, np.float32))
    return reading(path, mask=True)


# ------------------------------------------------------------------------------ ingest
@case("ingest-jpeg-mask", IngestError, "JPEG masks are refused")
def _jpeg_mask(d):
    root = dataset(d)
    Image.fromarray(MASK).save(root / "masks" / "img0.jpg")
    (root / "masks" / "img0.tif").unlink()
    return ingest_of(root), root / "masks" / "img0.jpg"


@case("ingest-gray-into-2-channels", IngestError, r"repeated only into RGB\(A\)")
def _two_channels(d):
    root = dataset(d, images={"img1": np.stack([IMAGE, IMAGE], -1)})
    return ingest_of(root), root / "images" / "img1.tif"


@case("ingest-class-id-above-255", IngestError, "class id 300 in a class mask")
def _class_300(d):
    root = dataset(d, masks={"img2": MASK.astype(np.uint16) * 300})
    return ingest_of(root), root / "masks" / "img2.tif"


@case("ingest-class-id-outside-num-classes", IngestError, "outside --num-classes 3")
def _class_outside(d):
    root = dataset(d, masks={"img2": (MASK * 5).astype(np.uint8)})
    return ingest_of(root, num_classes=3), root / "masks" / "img2.tif"


for _bad in ("../../etc/passwd", "/etc/passwd", "sub/img0", "..", "C:img0"):

    @case(f"split-name {_bad}", IngestError, "are paths, not file stems")
    def _escape(d, bad=_bad):
        root = dataset(d)
        names = {"train": ["img0", "img1", "img2", bad], "test": []}
        split = hostile.write(d / "split.json", json.dumps(names).encode())
        return ingest_of(root, split=split), split


@case("split-not-json", IngestError, "cannot read the split")
def _split_not_json(d):
    root = dataset(d)
    split = hostile.write(d / "split.json", b"{train: img0")
    return ingest_of(root, split=split), split


@case("dataset-yaml-python-tag", IngestError, "cannot read dataset metadata")
def _yaml_tag(d):
    root = dataset(d)
    evil = f"!!python/object/apply:os.system ['touch {d / 'pwned'}']\n"
    meta = hostile.write(d / "dataset.yaml", evil.encode())
    return ingest_of(root, metadata=meta), meta


@case("dataset-yaml-not-a-mapping", IngestError, "expected a mapping")
def _yaml_list(d):
    root = dataset(d)
    meta = hostile.write(d / "dataset.yaml", b"- a\n- b\n")
    return ingest_of(root, metadata=meta), meta


@case("ingest-size-mismatch", IngestError, "a mask must match its image pixel for pixel")
def _size(d):
    root = dataset(d, masks={"img1": MASK[:16]})
    return ingest_of(root), root / "masks" / "img1.tif"


@case("ingest-mask-missing", IngestError, "no mask with stem 'img1'")
def _missing(d):
    root = dataset(d)
    (root / "masks" / "img1.tif").unlink()
    return ingest_of(root), root / "images" / "img1.tif"


@case("ingest-broken-link-in-folder", IngestError, "broken symbolic link")
def _link_in_folder(d):
    root = dataset(d)
    (root / "images" / "img1.tif").unlink()
    (root / "images" / "img1.tif").symlink_to("/nonexistent/img1.tif")
    return ingest_of(root), root / "images" / "img1.tif"


@case("ingest-bomb-in-folder", IngestError, "more than the limit")
def _bomb_in_folder(d):
    root = dataset(d)
    hostile.write(root / "images" / "img1.tif", hostile.tiff_claiming(100_000, 100_000))
    return ingest_of(root), root / "images" / "img1.tif"


# ------------------------------------------------------------------------------ config, checkpoints
@case("config-yaml-python-tag", ConfigError, "python/object")
def _config_tag(d):
    evil = f"seed: !!python/object/apply:os.system ['touch {d / 'pwned'}']\n"
    path = hostile.write(d / "run.yaml", evil.encode())
    return lambda: load_config(path), path


def _checkpoint(d: Path) -> Path:
    return save_checkpoint(d / "ckpt" / "good.pt", {"model_state": {"w": torch.zeros(4096)}})


@case("checkpoint-pickle-payload", CheckpointError, "refused to load")
def _pickle(d):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'pwned'}",))

    path = d / "evil.pt"
    torch.save({"format": "scarce-checkpoint", "x": Payload()}, path)
    return lambda: load_checkpoint(path), path


@case("checkpoint-truncated", CheckpointError, "unreadable or truncated checkpoint")
def _ckpt_truncated(d):
    path = hostile.truncated(_checkpoint(d), d / "half.pt", 0.5)
    return lambda: load_checkpoint(path), path


@case("checkpoint-empty", CheckpointError, "unreadable or truncated checkpoint")
def _ckpt_empty(d):
    path = hostile.write(d / "empty.pt", b"")
    return lambda: load_checkpoint(path), path


@case("checkpoint-random-bytes", CheckpointError, "unreadable or truncated checkpoint")
def _ckpt_noise(d):
    path = hostile.write(d / "noise.pt", np.random.default_rng(1).bytes(10_000))
    return lambda: load_checkpoint(path), path


@case("checkpoint-not-scarce", CheckpointError, "not a Scarce checkpoint")
def _ckpt_tensor(d):
    path = d / "tensor.pt"
    torch.save(torch.zeros(3), path)
    return lambda: load_checkpoint(path), path


@case("checkpoint-from-the-future", CheckpointError, "newer than this Scarce understands")
def _ckpt_future(d):
    path = d / "future.pt"
    torch.save({"format": "scarce-checkpoint", "format_version": 99}, path)
    return lambda: load_checkpoint(path), path


# ------------------------------------------------------------------------------ databases
def _database(d: Path) -> Path:
    root = dataset(d / "data", n=4)
    ingest(root / "images", root / "masks", d / "db", progress=False, train_fraction=1.0)
    shutil.rmtree(d / "data")
    return d / "db" / "train.lmdb"


def _damaged_at(db: Path, offset: int, data: bytes) -> Path:
    with open(db / "data.mdb", "r+b") as fh:
        fh.seek(offset)
        fh.write(data)
    return db


def _read_all(db: Path):
    def read():
        with SampleStore(db) as store:
            return [store[i] for i in range(len(store))]

    return read


@case("lmdb-meta-pages-garbage", StoreError, "damaged or not an LMDB database")
def _meta(d):
    db = _damaged_at(_database(d), 0, np.random.default_rng(2).bytes(8192))
    return _read_all(db), db


@case("lmdb-pixel-page-flipped", StoreError, "checksum mismatch")
def _pixels(d):
    db = _database(d)
    with SampleStore(db) as store:
        record = store.read_raw(1)
    at = (db / "data.mdb").read_bytes().index(record[-1024:])  # the record's last pixels
    return _read_all(_damaged_at(db, at + 100, b"\xff" * 64)), db


@case("lmdb-truncated", StoreError, "damaged or not an LMDB database")
def _lmdb_truncated(d):
    db = _database(d)
    os.truncate(db / "data.mdb", 4096)
    return _read_all(db), db


@case("lmdb-empty-data-file", StoreError, "damaged or not an LMDB database")
def _lmdb_empty(d):
    db = _database(d)
    os.truncate(db / "data.mdb", 0)
    return _read_all(db), db


@case("lmdb-no-data-file", StoreError, "not an LMDB database")
def _lmdb_none(d):
    (d / "fake.lmdb").mkdir()
    return _read_all(d / "fake.lmdb"), d / "fake.lmdb"


# ------------------------------------------------------------------------------ stacks
@case("zarr-stack-claiming-1e11-voxels", ImageFileError, "voxels in the stack")
def _zarr(d):
    import zarr

    path = d / "big.zarr"
    zarr.create_array(store=str(path), shape=(10, 100_000, 100_000), chunks=(1, 1024, 1024),
                      dtype="uint8")  # fmt: skip
    return lambda: open_stack(path), path


@case("hdf5-stack-claiming-1e11-voxels", ImageFileError, "voxels in the stack")
def _hdf5(d):
    import h5py

    path = d / "big.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("main", shape=(10, 100_000, 100_000), dtype="uint8", chunks=(1, 64, 64))
    return lambda: open_stack(path), path


@case("tiff-stack-claiming-1e11-voxels", ImageFileError, "voxels in the stack")
def _tiff_stack(d):
    path = hostile.write(d / "stack.tif", hostile.tiff_claiming(100_000, 100_000))
    return lambda: open_stack(path), path


@case("stack-of-unknown-format", InputError, "unsupported stack format")
def _unknown_stack(d):
    path = hostile.write(d / "stack.raw", b"\x00" * 100)
    return lambda: open_stack(path), path


def _snapshot(folder: Path) -> dict[str, int]:
    """Every path below ``folder`` (links not followed) and its size."""
    return {
        str(p.relative_to(folder)): (p.lstat().st_size if not p.is_dir() else -1)
        for p in folder.rglob("*")
    }


def test_the_corpus_has_at_least_40_distinct_cases():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) >= 40


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_naming_the_file_and_nothing_is_written(bad, tmp_path):
    action, named = bad.build(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(bad.error, match=bad.match) as caught:
        action()
    message = str(caught.value)
    assert str(named) in message, message
    if not isinstance(caught.value, IngestError):
        assert "\n" not in message, message
    assert _snapshot(tmp_path) == before  # nothing written, nothing half-written
    assert not (tmp_path / "pwned").exists()  # no payload ran

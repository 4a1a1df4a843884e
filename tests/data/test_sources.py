"""Ingest reads Zarr images and maps mask values (--label-map: ilastik scribbles train)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from scarce.data.ingest import ingest
from scarce.data.sources import IGNORE_DEFAULT, parse_label_map
from scarce.data.store import SampleStore, read_metadata
from scarce.errors import IngestError, InputError
from scarce.io import list_image_files, read_image, read_mask, stem_of


def test_label_maps_parse_and_apply():
    ilastik = parse_label_map("ilastik")
    scribbles = np.array([[0, 1, 2], [2, 0, 1]], np.uint8)
    assert ilastik.apply(scribbles, "m.png").tolist() == [[255, 0, 1], [1, 255, 0]]
    explicit = parse_label_map("0:ignore, 1:0, 2:1, 3:1")
    assert explicit.ignores and explicit.text() == "0:ignore,1:0,2:1,3:1"
    assert explicit.apply(np.array([[3, 0]]), "m.png").tolist() == [[1, 255]]
    with pytest.raises(ValueError, match=r"m.png: mask values \[7\] are not in --label-map"):
        explicit.apply(np.array([[7, 1]]), "m.png")
    for bad in ("0=1", "a:1", "1:-2", "1:0,1:2"):
        with pytest.raises(InputError, match="--label-map: cannot read"):
            parse_label_map(bad)
    assert parse_label_map(None) is None


@pytest.fixture(scope="module")
def scribbles(shared_data, tmp_path_factory):
    """Four nist_rpe images with ilastik-style scribbles: 0 unlabelled, 1 background, 2 cell."""
    root = tmp_path_factory.mktemp("scribbles")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    src = shared_data / "nist_rpe"
    for f in list_image_files(src / "images")[:4]:
        tifffile.imwrite(root / "images" / f.name, read_image(f)[0])
        mask = read_mask(src / "masks" / f.name).astype(np.uint8) + 1
        mask[:, 40:] = 0  # only a strip of each image is annotated
        tifffile.imwrite(root / "masks" / f.name, mask)
    return root


def test_ilastik_scribbles_ingest_with_the_unlabelled_pixels_ignored(scribbles, shared_data):
    split = {"train": [stem_of(f) for f in list_image_files(scribbles / "images")]}
    split["test"] = [split["train"].pop()]
    ingest(
        scribbles / "images",
        scribbles / "masks",
        scribbles / "db",
        split=split,
        label_map="ilastik",
        progress=False,
    )
    meta = read_metadata(scribbles / "db" / "train.lmdb")
    assert meta["ignore_label"] == IGNORE_DEFAULT
    assert meta["class_ids"] == [0, 1, IGNORE_DEFAULT]
    with SampleStore(scribbles / "db" / "train.lmdb") as store:
        mask = store[0].mask
    truth = read_mask(
        shared_data / "nist_rpe" / "masks" / list_image_files(scribbles / "masks")[0].name
    )
    assert np.array_equal(mask[:, :40], truth[:, :40])
    assert (mask[:, 40:] == IGNORE_DEFAULT).all()
    # without the map, values 1/2 would be classes and 0 background: refused by a wrong map
    with pytest.raises(IngestError, match=r"mask values \[0, 1, 2\] are not in --label-map 5:1"):
        ingest(
            scribbles / "images",
            scribbles / "masks",
            scribbles / "db2",
            split=split,
            label_map="5:1",
            progress=False,
        )


def test_ome_zarr_images_ingest_like_their_tiffs(shared_data, tmp_path):
    omezarr = pytest.importorskip("scarce.data.omezarr")
    pytest.importorskip("ome_zarr")
    src = shared_data / "nist_rpe"
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    files = list_image_files(src / "images")[:3]
    for f in files:
        with omezarr.staged(tmp_path / "images" / f"{stem_of(f)}.ome.zarr") as group:
            omezarr.write_image(group, read_image(f), pixel_size_um=0.65)
        (tmp_path / "masks" / f.name).symlink_to(src / "masks" / f.name)
    split = {"train": [stem_of(f) for f in files[:2]], "test": [stem_of(files[2])]}
    ingest(tmp_path / "images", tmp_path / "masks", tmp_path / "db", split=split, progress=False)
    with SampleStore(tmp_path / "db" / "test.lmdb") as store:
        assert np.array_equal(store[0].image, read_image(files[2]))

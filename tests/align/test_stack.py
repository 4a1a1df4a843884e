"""Stack ingest: every layout reads, every problem is named, nothing half-written."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import tifffile

from scarce.align.stack import ingest_stack, open_stack
from scarce.data.store import SampleStore, read_metadata
from scarce.errors import IngestError, OutputExistsError
from scarce.io import read_image


@pytest.fixture(scope="module")
def slices(shared_data) -> np.ndarray:
    """Six real ISBI 2012 sections (uint8), cropped to 96 x 128: (6, 96, 128)."""
    folder = shared_data / "isbi2012" / "unlabeled"
    return np.stack([read_image(folder / f"{z:02d}.png")[0, :96, :128] for z in range(6)])


def test_tiff_folder_zarr_and_hdf5_read_the_same_slices(slices, tmp_path):
    import zarr

    tifffile.imwrite(tmp_path / "s.tif", slices, photometric="minisblack")
    (tmp_path / "folder").mkdir()
    for z, image in enumerate(slices):
        tifffile.imwrite(tmp_path / "folder" / f"{z:03d}.tif", image, photometric="minisblack")
    zarr.create_array(str(tmp_path / "s.zarr"), data=slices)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["main"] = slices
        f["two"] = np.stack([slices, slices[::-1]])  # (N, Z, H, W): two stacks
    for spec in ("s.tif", "folder", "s.zarr", "s.h5"):
        (stack,) = open_stack(tmp_path / spec)
        assert stack.shape == slices.shape, spec
        np.testing.assert_array_equal(stack.slice(4), slices[4])
    two = open_stack(f"{tmp_path / 's.h5'}:two")
    assert [s.name for s in two] == ["s[0]", "s[1]"]
    np.testing.assert_array_equal(two[1].slice(0), slices[5])


def test_ingest_writes_pairs_that_never_cross_stacks(slices, tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", slices, photometric="minisblack")
    tifffile.imwrite(tmp_path / "b.tif", slices[:4], photometric="minisblack")
    summary = ingest_stack(
        [tmp_path / "a.tif", tmp_path / "b.tif"],
        tmp_path / "db",
        test_slices="4:6",
        missing_value=0,
    )
    assert summary["train"] == 8 and summary["test"] == 2  # b has no slice 4 or 5
    meta = read_metadata(tmp_path / "db" / "train.lmdb")
    assert meta["kind"] == "stack" and meta["missing_value"] == 0
    names = [s["name"] for s in meta["samples"]]
    for src, tgt in meta["pairs"]:  # source z+1 -> target z, same stack
        s, t = meta["samples"][src], meta["samples"][tgt]
        assert s["source"] == t["source"] and s["z"] == t["z"] + 1
    assert len(meta["pairs"]) == 3 + 3 and names[0] == "a@0"
    stats = meta["slice_stats"][0]
    assert stats["mean"] == pytest.approx(slices[0][slices[0] != 0].mean())
    with SampleStore(tmp_path / "db" / "train.lmdb") as st:
        sample = st[5]
        assert sample.image.shape == (1, 96, 128) and sample.info == {"z": 1}
        np.testing.assert_array_equal(sample.image[0], slices[1])
    test = read_metadata(tmp_path / "db" / "test.lmdb")
    assert test["pairs"] == [[1, 0]]
    with pytest.raises(OutputExistsError):
        ingest_stack(tmp_path / "a.tif", tmp_path / "db")


def test_every_problem_is_named_and_nothing_is_written(slices, tmp_path):
    bad = tmp_path / "folder"
    bad.mkdir()
    tifffile.imwrite(bad / "00.tif", slices[0], photometric="minisblack")
    tifffile.imwrite(bad / "01.tif", slices[1, :90])  # another size
    tifffile.imwrite(bad / "02.tif", np.stack([slices[2]] * 3, -1))  # RGB
    (bad / "03.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # unreadable
    tifffile.imwrite(tmp_path / "one.tif", slices[0])  # a single slice
    floats = slices[:3].astype(np.float32)
    floats[1, 5, 5] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", floats, photometric="minisblack")
    with pytest.raises(IngestError) as err:
        ingest_stack(
            [bad, tmp_path / "one.tif", tmp_path / "nan.tif", tmp_path / "gone.tif"],
            tmp_path / "db",
        )
    text = str(err.value)
    for expected in (
        "01.tif: 90x128",
        "02.tif",
        "03.png",
        "one.tif: 1 slice(s)",
        "nan.tif slice 1: 1 NaN/inf",
        "gone.tif: no such stack",
    ):
        assert expected in text, expected
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["folder", "one.tif", "nan.tif"]
    )  # no database, no temporary folder

"""OME-Zarr in and out: lazy reading with axes and pixel size; outputs that ome-zarr validates."""

from __future__ import annotations

import numpy as np
import pytest

from scarce.errors import ImageFileError
from scarce.io import read_image

pytest.importorskip("ome_zarr")
zarr = pytest.importorskip("zarr")
from scarce.data import omezarr  # noqa: E402


@pytest.fixture(scope="module")
def nist_image(shared_data) -> np.ndarray:
    return read_image(shared_data / "nist_rpe" / "images" / "img_000580.tif")  # (1, 256, 256)


def validate(path) -> None:
    """Validate an OME-Zarr image group (and its label images) against NGFF 0.4."""
    from ome_zarr_models.v04 import Image
    from ome_zarr_models.v04.labels import Labels

    group = zarr.open_group(str(path), mode="r")
    Image.from_zarr(group)
    if "labels" in group:
        Labels.from_zarr(group["labels"])


def test_image_and_labels_round_trip_with_pixel_size_and_axes(tmp_path, nist_image):
    classes = (nist_image[0] > np.median(nist_image)).astype(np.uint8)
    with omezarr.staged(tmp_path / "out.ome.zarr") as group:
        omezarr.write_image(group, nist_image, pixel_size_um=0.65, chunks=128)
        omezarr.write_labels(group, "class_map", classes, pixel_size_um=0.65, chunks=128)
    path = tmp_path / "out.ome.zarr"
    assert not (tmp_path / ".out.ome.zarr.tmp").exists()
    validate(path)
    lazy = omezarr.open_image(path)
    assert lazy.pixel_size_um == pytest.approx(0.65)
    assert type(lazy.array).__name__ == "Array"  # dask: nothing read yet
    assert np.array_equal(lazy.array.compute(), nist_image)
    assert np.array_equal(omezarr.open_labels(path, "class_map").compute(), classes)
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = {str(n.zarr.path).rstrip("/").split("/")[-1]: n for n in Reader(parse_url(path))()}
    label = nodes["class_map"]
    assert [a["name"] for a in label.metadata["axes"]] == ["y", "x"]
    assert label.metadata["axes"][0]["unit"] == "micrometer"


def test_a_failed_write_leaves_the_old_output(tmp_path, nist_image):
    out = tmp_path / "x.ome.zarr"
    with omezarr.staged(out) as group:
        omezarr.write_image(group, nist_image)
    with pytest.raises(RuntimeError), omezarr.staged(out) as group:
        omezarr.write_image(group, nist_image[:, :10])
        raise RuntimeError("interrupted")
    assert omezarr.open_image(out).array.shape == nist_image.shape
    assert not (tmp_path / ".x.ome.zarr.tmp").exists()


def test_axes_are_reordered_and_plain_zarr_arrays_read(tmp_path, nist_image):
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    root = zarr.open_group(str(tmp_path / "tczyx.ome.zarr"), mode="w", zarr_format=2)
    five = np.repeat(nist_image, 2, axis=0)[None, :, None]  # (t=1, c=2, z=1, y, x)
    five[0, 1, 0] = nist_image[0]
    five[0, 0, 0] = 0
    write_image(five, root, scale_factors=(), scaler=None, axes="tczyx", fmt=FormatV04())
    lazy = omezarr.open_image(tmp_path / "tczyx.ome.zarr")
    assert lazy.array.shape == (2, 256, 256) and lazy.pixel_size_um is None
    assert np.array_equal(lazy.array.compute()[1], nist_image[0])
    assert not lazy.array.compute()[0].any()
    plain = zarr.open_array(
        str(tmp_path / "plain.zarr"), mode="w", shape=(256, 256, 3), dtype="uint16", zarr_format=2
    )
    plain[:] = np.repeat(nist_image[0][..., None], 3, axis=2)
    image = omezarr.read_image_array(tmp_path / "plain.zarr")
    assert image.shape == (3, 256, 256) and np.array_equal(image[2], nist_image[0])


def test_stacks_and_non_zarr_folders_are_refused_naming_the_file(tmp_path, nist_image):
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    root = zarr.open_group(str(tmp_path / "zstack.ome.zarr"), mode="w", zarr_format=2)
    write_image(
        np.stack([nist_image[0]] * 3),
        root,
        scale_factors=(),
        scaler=None,
        axes="zyx",
        fmt=FormatV04(),
    )
    with pytest.raises(
        ImageFileError,
        match=r"zstack.ome.zarr: expected a 2D image.*\['z', 'y', 'x'\] and shape \(3, 256",
    ):
        omezarr.open_image(tmp_path / "zstack.ome.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(ImageFileError, match="empty.zarr: neither an OME-Zarr image"):
        omezarr.open_image(tmp_path / "empty.zarr")

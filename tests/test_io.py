"""Tests of scarce.io: dtype and axis rules, errors that name the file, label image writing."""

from pathlib import Path

import cv2
import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from PIL import Image

from scarce import io
from tests.shared import SHARED_DATA

DATA = SHARED_DATA


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "uint32", "float32"])
def test_tiff_image_dtypes_kept(tmp_path, rng, dtype):
    array = (rng.random((12, 20)) * 1000).astype(dtype)
    tifffile.imwrite(tmp_path / "a.tif", array)
    image = io.read_image(tmp_path / "a.tif")
    assert image.shape == (1, 12, 20) and image.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(image[0], array)


def test_float64_bool_and_big_endian_conversions(tmp_path, rng):
    values = rng.random((8, 9)) * 1e3
    tifffile.imwrite(tmp_path / "f64.tif", values)
    image = io.read_image(tmp_path / "f64.tif")
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image[0], values.astype(np.float32))
    tifffile.imwrite(tmp_path / "bool.tif", values > 500)
    assert io.read_image(tmp_path / "bool.tif").dtype == np.uint8
    big = rng.integers(0, 60000, (8, 9)).astype(">u2")
    tifffile.imwrite(tmp_path / "be.tif", big, byteorder=">")
    image = io.read_image(tmp_path / "be.tif")
    assert image.dtype.isnative and image.dtype == np.uint16
    np.testing.assert_array_equal(image[0], big)


def test_channel_axis_detected_or_given(tmp_path, rng):
    hwc = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "hwc.tif", hwc, photometric="rgb")
    np.testing.assert_array_equal(io.read_image(tmp_path / "hwc.tif"), hwc.transpose(2, 0, 1))
    chw = rng.integers(0, 4000, (4, 30, 40), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "chw.tif", chw, photometric="minisblack")
    np.testing.assert_array_equal(io.read_image(tmp_path / "chw.tif"), chw)
    ambiguous = rng.integers(0, 255, (4, 30, 12), dtype=np.uint8)  # both ends <= 16
    tifffile.imwrite(tmp_path / "amb.tif", ambiguous, photometric="minisblack")
    assert io.read_image(tmp_path / "amb.tif").shape == (12, 4, 30)  # last axis by default
    np.testing.assert_array_equal(io.read_image(tmp_path / "amb.tif", channel_axis=0), ambiguous)
    tifffile.imwrite(tmp_path / "big.tif", np.zeros((20, 30, 40), np.uint8))
    with pytest.raises(io.ImageFileError, match="big.tif.*channel_axis"):
        io.read_image(tmp_path / "big.tif")


def test_png_rgb_order_and_16bit_colour_kept(tmp_path, rng):
    rgb = rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)
    iio.imwrite(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(io.read_image(tmp_path / "rgb.png"), rgb.transpose(2, 0, 1))
    rgb16 = rng.integers(0, 65535, (10, 14, 3), dtype=np.uint16)  # Pillow alone gives 8 bits
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])
    image = io.read_image(tmp_path / "rgb16.png")
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image, rgb16.transpose(2, 0, 1))
    gray16 = rng.integers(0, 65535, (10, 14), dtype=np.uint16)
    iio.imwrite(tmp_path / "g16.png", gray16)
    np.testing.assert_array_equal(io.read_image(tmp_path / "g16.png")[0], gray16)


def test_image_errors_name_the_file(tmp_path, rng):
    tifffile.imwrite(tmp_path / "nan.tif", np.array([[1.0, np.nan], [np.inf, 0]], np.float32))
    with pytest.raises(io.ImageFileError, match=r"nan.tif: image has 2 NaN/inf"):
        io.read_image(tmp_path / "nan.tif")
    tifffile.imwrite(tmp_path / "i64.tif", np.zeros((4, 4), np.int64))
    with pytest.raises(io.ImageFileError, match="i64.tif: unsupported image dtype int64"):
        io.read_image(tmp_path / "i64.tif")
    tifffile.imwrite(
        tmp_path / "4d.tif", np.zeros((2, 3, 20, 20), np.uint8), photometric="minisblack"
    )
    with pytest.raises(io.ImageFileError, match="4d.tif: expected a 2D image"):
        io.read_image(tmp_path / "4d.tif")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(io.ImageFileError, match="text.png: unreadable"):
        io.read_image(tmp_path / "text.png")


@pytest.mark.parametrize("name", ["t.png", "t.tif", "t.jpg"])
def test_truncated_files_are_errors(tmp_path, rng, name):
    array = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    if name.endswith(".tif"):
        tifffile.imwrite(tmp_path / name, array)
    else:
        iio.imwrite(tmp_path / name, array)
    with pytest.raises(io.ImageFileError, match=f"{name}: unreadable or truncated"):
        io.read_image(_truncate(tmp_path / name))


def test_mask_rules(tmp_path, rng):
    labels = rng.integers(0, 300, (9, 11)).astype(np.int32)
    tifffile.imwrite(tmp_path / "i32.tif", labels)
    np.testing.assert_array_equal(io.read_mask(tmp_path / "i32.tif"), labels)
    tifffile.imwrite(tmp_path / "hw1.tif", labels[..., None].astype(np.uint16))
    assert io.read_mask(tmp_path / "hw1.tif").shape == (9, 11)
    tifffile.imwrite(tmp_path / "fint.tif", labels.astype(np.float32))
    mask = io.read_mask(tmp_path / "fint.tif")
    assert mask.dtype == np.uint16  # smallest unsigned dtype holding 299
    np.testing.assert_array_equal(mask, labels)
    palette = Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.save(tmp_path / "p.png")  # palette masks: indices are the labels
    np.testing.assert_array_equal(io.read_mask(tmp_path / "p.png"), [[0, 1], [2, 3]])
    assert io.read_image(tmp_path / "p.png").shape == (3, 2, 2)  # as an image: colours


def test_mask_errors(tmp_path, rng):
    tifffile.imwrite(tmp_path / "half.tif", np.full((4, 4), 0.5, np.float32))
    with pytest.raises(io.ImageFileError, match="half.tif: mask has non-integral"):
        io.read_mask(tmp_path / "half.tif")
    tifffile.imwrite(tmp_path / "neg.tif", np.full((4, 4), -1, np.int16))
    with pytest.raises(io.ImageFileError, match=r"neg.tif: mask has negative labels \(min -1\)"):
        io.read_mask(tmp_path / "neg.tif")
    iio.imwrite(tmp_path / "rgb.png", rng.integers(0, 3, (4, 4, 3), dtype=np.uint8))
    with pytest.raises(io.ImageFileError, match="rgb.png: a mask must be a single-channel"):
        io.read_mask(tmp_path / "rgb.png")
    tifffile.imwrite(tmp_path / "c64.tif", np.zeros((4, 4), np.complex64))
    with pytest.raises(io.ImageFileError, match="c64.tif: unsupported mask dtype"):
        io.read_mask(tmp_path / "c64.tif")


@pytest.mark.parametrize(
    "suffix,max_label,dtype",
    [(".tif", 70000, np.uint32), (".png", 300, np.uint16), (".png", 7, np.uint8)],
)
def test_write_label_image_round_trip(tmp_path, rng, suffix, max_label, dtype):
    labels = rng.integers(0, max_label + 1, (20, 30)).astype(np.int64)
    labels[0, 0] = max_label
    path = io.write_label_image(tmp_path / f"labels{suffix}", labels)
    back = io.read_mask(path)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"labels{suffix}"]  # no temp left


def test_write_label_image_errors(tmp_path):
    with pytest.raises(ValueError, match="labels must be"):
        io.write_label_image(tmp_path / "x.png", np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="non-negative"):
        io.write_label_image(tmp_path / "x.png", -np.ones((2, 2), np.int32))
    with pytest.raises(ValueError, match="use .tif"):
        io.write_label_image(tmp_path / "x.png", np.full((2, 2), 70000))
    with pytest.raises(ValueError, match="unsupported label format"):
        io.write_label_image(tmp_path / "x.jpg", np.zeros((2, 2), np.uint8))


def test_list_image_files(tmp_path):
    for name in ("b.tif", "a.PNG", ".hidden.png", "notes.txt", "c.jpeg"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in io.list_image_files(tmp_path)] == ["a.PNG", "b.tif", "c.jpeg"]
    assert [p.name for p in io.list_image_files(tmp_path, io.MASK_EXTENSIONS)] == ["a.PNG", "b.tif"]
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        io.list_image_files(tmp_path / "missing")


def test_real_files():
    if not DATA.is_dir():
        pytest.skip(f"real datasets not found at {DATA}")
    image = io.read_image(DATA / "nist_rpe" / "images" / "img_000580.tif")
    assert image.shape == (1, 256, 256) and image.dtype == np.uint16
    mask = io.read_mask(DATA / "nist_rpe" / "masks" / "img_000580.tif")
    assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 1}
    rgb = next(
        p
        for p in sorted((DATA / "dsb2018" / "images").glob("*.png"))
        if Image.open(p).mode == "RGB"
    )
    assert io.read_image(rgb).shape[0] == 3


def test_tiff_outputs_carry_axes_and_pixel_size(tmp_path, shared_data):
    """Fiji reads ImageJ metadata (uint8/uint16/float32) and OME-XML (other dtypes)."""
    mask = io.read_mask(sorted((shared_data / "bbbc039" / "masks").iterdir())[0])
    io.write_label_image(tmp_path / "classes.tif", (mask > 0).astype(np.uint8), pixel_size_um=0.65)
    io.write_label_image(tmp_path / "many.tif", mask.astype(np.uint32) * 1000, pixel_size_um=0.65)
    probs = np.stack([mask == 0, mask > 0]).astype(np.float32)
    io.write_float_image(tmp_path / "prob.tif", probs, pixel_size_um=0.65)
    with tifffile.TiffFile(tmp_path / "classes.tif") as tif:
        assert tif.series[0].axes == "YX" and tif.imagej_metadata["unit"] == "um"
        x_res = tif.pages[0].tags["XResolution"].value
        assert x_res[1] / x_res[0] == pytest.approx(0.65, rel=1e-6)
    with tifffile.TiffFile(tmp_path / "prob.tif") as tif:
        assert tif.series[0].axes == "CYX" and tif.series[0].shape == probs.shape
        assert tif.imagej_metadata["channels"] == 2 and tif.imagej_metadata["unit"] == "um"
        assert np.array_equal(tif.asarray(), probs)
    with tifffile.TiffFile(tmp_path / "many.tif") as tif:  # uint32 labels: OME-TIFF
        assert tif.is_ome and tif.series[0].axes == "YX" and tif.series[0].dtype == np.uint32
        assert 'PhysicalSizeX="0.65"' in tif.ome_metadata
        assert np.array_equal(tif.asarray(), mask.astype(np.uint32) * 1000)

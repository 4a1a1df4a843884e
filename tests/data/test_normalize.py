"""Tests of scarce.data.normalize on real microscopy images and edge cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scarce.data.normalize import (
    MAX_STAT_PIXELS,
    NORMALIZATION_MODES,
    noise_sigma,
    normalization_params,
    normalization_spec,
    normalize,
    signal_to_noise,
)
from tests.shared import SHARED_DATA

DATA = SHARED_DATA


def real_image(dataset: str) -> np.ndarray:
    folder = DATA / dataset / "images"
    if not folder.is_dir():
        pytest.skip(f"dataset {dataset} not found at {folder}")
    from scarce.io import read_image

    return read_image(sorted(folder.iterdir())[0])


def test_spec_is_plain_json_and_round_trips():
    images = [np.random.default_rng(0).normal(100, 5, (1, 40, 40))]
    for mode in NORMALIZATION_MODES:
        meta = {"intensity": {"mean": [266.5], "std": [120.0]}}
        spec = normalization_spec(mode, (2, 99), metadata=meta, images=images)
        assert json.loads(json.dumps(spec)) == spec
        assert spec["mode"] == mode and spec["percentiles"] == [2.0, 99.0]
    assert normalization_spec("zscore")["mean"] is None


def test_zscore_on_real_phase_contrast_image():
    image = real_image("nist_rpe")  # (1, 256, 256) uint16
    out = normalize(image, normalization_spec("zscore"))
    assert out.dtype == np.float32 and out.shape == image.shape
    assert abs(out.mean()) < 1e-4 and out.std() == pytest.approx(1.0, abs=1e-4)
    assert image.dtype == np.uint16  # input untouched


def test_percentile_on_real_fluorescence_image():
    image = real_image("bbbc039")  # (1, 520, 696) uint16, 12-bit camera
    spec = normalization_spec("percentile", (1.0, 99.8))
    offset, scale = normalization_params(image, spec)
    lo, hi = np.percentile(image, [1.0, 99.8])
    assert offset[0] == pytest.approx(lo) and scale[0] == pytest.approx(hi - lo)
    out = normalize(image, spec)
    assert np.mean(out < 0) == pytest.approx(0.01, abs=0.005)
    assert np.mean(out > 1) == pytest.approx(0.002, abs=0.002)


def test_channels_are_normalised_independently():
    rng = np.random.default_rng(0)
    image = np.stack(
        [
            rng.normal(10, 2, (64, 64)),
            rng.normal(-5000, 300, (64, 64)),
            rng.normal(0, 1e-3, (64, 64)),
        ]
    ).astype(np.float32)
    out = normalize(image, normalization_spec("zscore"))
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 0, atol=1e-3)
    np.testing.assert_allclose(out.std(axis=(1, 2)), 1, rtol=1e-3)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "uint32", "float32"])
@pytest.mark.parametrize("mode", ["zscore", "percentile", "robust"])
def test_constant_image_gives_zeros_not_nan(dtype, mode):
    value = np.iinfo(dtype).min if dtype == "int16" else 7  # -32768 must not overflow abs()
    image = np.full((2, 30, 40), value, dtype=dtype)
    spec = normalization_spec(mode, images=[image + np.arange(40, dtype=dtype)])
    offset, scale = normalization_params(image, spec)
    assert np.all(scale > 0) and np.all(np.isfinite(scale))
    out = normalize(image, spec)
    assert np.all(out == 0.0)


def test_big_image_statistics_use_a_deterministic_subsample():
    rng = np.random.default_rng(1)
    image = rng.gamma(2.0, 100.0, (1, 2100, 2100)).astype(np.float32)  # 4.4 Mpx > limit
    assert image.shape[1] * image.shape[2] > MAX_STAT_PIXELS
    spec = normalization_spec("zscore")
    offset, scale = normalization_params(image, spec)
    strided = image[:, ::2, ::2].astype(np.float64)  # ceil(sqrt(4.41 / 4)) = 2
    assert offset[0] == pytest.approx(strided.mean(), rel=1e-6)
    assert scale[0] == pytest.approx(strided.std(), rel=1e-6)
    assert offset[0] == pytest.approx(image.mean(), rel=0.01)  # and close to the full image
    np.testing.assert_array_equal(normalization_params(image, spec)[0], offset)


def test_dataset_mode_uses_metadata_and_checks_channels():
    meta = {"intensity": {"mean": [100.0, 2.0], "std": [10.0, 0.5]}}
    spec = normalization_spec("dataset", metadata=meta)
    image = np.stack([np.full((8, 8), 120.0), np.full((8, 8), 1.0)]).astype(np.float32)
    out = normalize(image, spec)
    np.testing.assert_allclose(out[0], 2.0)
    np.testing.assert_allclose(out[1], -2.0)
    with pytest.raises(ValueError, match="2 channel"):
        normalization_params(image[:1], spec)


def test_errors_say_how_to_fix():
    with pytest.raises(ValueError, match="not one of"):
        normalization_spec("minmax")
    with pytest.raises(ValueError, match="lo < hi"):
        normalization_spec("percentile", (99.0, 1.0))
    with pytest.raises(ValueError, match="floor_fraction"):
        normalization_spec("robust", floor_fraction=-1)
    with pytest.raises(ValueError, match="training images"):
        normalization_spec("robust")
    spec = normalization_spec("robust", images=[np.ones((2, 8, 8))])
    with pytest.raises(ValueError, match="2 channel"):
        normalization_params(np.ones((1, 8, 8)), spec)
    with pytest.raises(ValueError, match="re-ingest"):
        normalization_spec("dataset", metadata={"classes": [0, 1]})
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        normalization_params(np.zeros((8, 8)), normalization_spec("zscore"))
    bad = np.zeros((1, 8, 8), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        normalization_params(bad, normalization_spec("zscore"))


def bbbc039_field(empty: bool, index: int = 0) -> np.ndarray:
    """The ``index``-th bbbc039 image whose mask is empty (``empty``) or holds >= 50 nuclei."""
    from scarce.io import list_image_files, read_image, read_mask

    folder = DATA / "bbbc039"
    if not folder.is_dir():
        pytest.skip(f"bbbc039 not found at {folder}")
    for f in list_image_files(folder / "images"):
        count = len(np.unique(read_mask(folder / "masks" / f.name))) - 1
        if (count == 0) if empty else (count >= 50):
            if index == 0:
                return read_image(f)
            index -= 1
    raise AssertionError("bbbc039 has no such field")


def robust_spec() -> dict:
    """``robust``, its floor fixed on five bbbc039 fields with nuclei (as training would)."""
    return normalization_spec("robust", images=[bbbc039_field(False, i) for i in range(1, 6)])


def test_noise_sigma_measures_known_noise_under_smooth_structure():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:300, :400]
    smooth = 1000 + 2.0 * xx + 500 * np.exp(-((yy - 150) ** 2 + (xx - 200) ** 2) / 5000)
    image = (smooth + rng.normal(0, 7.0, smooth.shape))[None].astype(np.float32)
    assert noise_sigma(image)[0] == pytest.approx(7.0, rel=0.05)
    assert noise_sigma(3 * image - 40)[0] == pytest.approx(3 * noise_sigma(image)[0], rel=1e-5)
    assert signal_to_noise(image * 5 + 3)[0] == pytest.approx(signal_to_noise(image)[0], rel=1e-5)
    flat = np.full((1, 50, 50), 9, dtype=np.uint8)  # quantised, no measurable noise
    assert noise_sigma(flat)[0] == pytest.approx(1 / np.sqrt(12))
    big = rng.normal(0, 2.0, (1, 2100, 2100)).astype(np.float32)  # bands of rows
    assert noise_sigma(big)[0] == pytest.approx(2.0, rel=0.02)


def test_robust_equals_percentile_on_a_field_with_nuclei():
    image = bbbc039_field(empty=False)
    spec = robust_spec()
    assert 100 < spec["training_snr"][0] < 300  # nuclei span 100-300 noise sigmas
    assert spec["noise_floor"] == [pytest.approx(0.25 * spec["training_snr"][0])]
    robust = normalization_params(image, spec)
    plain = normalization_params(image, normalization_spec("percentile"))
    np.testing.assert_array_equal(robust[0], plain[0])
    np.testing.assert_array_equal(robust[1], plain[1])  # the floor is far below the range


def test_robust_keeps_a_real_empty_field_dark():
    image = bbbc039_field(empty=True)
    plain = normalize(image, normalization_spec("percentile"))
    robust = normalize(image, robust_spec())
    assert np.percentile(plain, 99.8) == pytest.approx(1.0, abs=1e-4)  # noise stretched
    assert np.percentile(robust, 99.8) < 0.3  # about a quarter of a nucleus field's range
    assert robust.std() < 0.05


def test_robust_puts_an_empty_fields_background_near_zero():
    image = bbbc039_field(empty=True)
    spec = robust_spec()
    assert spec["floor_location"] == "blend"
    low = normalize(image, {**spec, "floor_location": "low"})  # offset = p1
    blend = normalize(image, spec)
    full = normalize(bbbc039_field(empty=False), spec)
    background = np.median(full)  # where a nucleus field's background lies
    # with p1 as the location the empty field's background sits well above a nucleus
    # field's (uneven illumination spreads p1..median); blended, it lands beside it
    assert np.median(low) > background + 0.05
    assert abs(np.median(blend) - background) < 0.03
    np.testing.assert_allclose(np.std(blend), np.std(low), rtol=1e-6)  # same scale
    # the location follows the floor continuously: unfloored fields are untouched
    fields = [bbbc039_field(False, i) for i in range(6, 9)]
    for f in fields:
        np.testing.assert_array_equal(
            normalization_params(f, spec)[0],
            normalization_params(f, {**spec, "floor_location": "low"})[0],
        )


@pytest.mark.parametrize("empty", [False, True])
def test_robust_is_invariant_to_gain_offset_and_bit_depth(empty):
    image = bbbc039_field(empty)  # uint16, 12-bit camera values
    spec = robust_spec()
    ref = normalize(image, spec)
    x = image.astype(np.float64)
    exact = {
        "gain x4 (uint16)": (image * 4).astype(np.uint16),
        "gain x0.1 (float)": (x * 0.1).astype(np.float32),
        "offset -500 (float)": (x - 500).astype(np.float32),
        "offset +500 (uint16)": (image + 500).astype(np.uint16),
    }
    for name, other in exact.items():
        np.testing.assert_allclose(normalize(other, spec), ref, atol=2e-4, err_msg=name)
    lo, hi = x.min(), x.max()
    eight = np.round(255 * (x - lo) / (hi - lo)).astype(np.uint8)  # "save as 8-bit"
    diff = np.abs(normalize(eight, spec) - ref)
    step = 1 / 255 * (hi - lo) / normalization_params(image, spec)[1][0]  # one 8-bit level
    assert diff.mean() < 0.5 * step + 0.01 and diff.max() < step + 0.05

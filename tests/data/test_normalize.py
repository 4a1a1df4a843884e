"""Tests of scarce.data.normalize on real microscopy images and edge cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scarce.data.normalize import (
    MAX_STAT_PIXELS,
    NORMALIZATION_MODES,
    normalization_params,
    normalization_spec,
    normalize,
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
    for mode in NORMALIZATION_MODES:
        meta = {"intensity": {"mean": [266.5], "std": [120.0]}}
        spec = normalization_spec(mode, (2, 99), metadata=meta)
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
@pytest.mark.parametrize("mode", ["zscore", "percentile"])
def test_constant_image_gives_zeros_not_nan(dtype, mode):
    value = np.iinfo(dtype).min if dtype == "int16" else 7  # -32768 must not overflow abs()
    image = np.full((2, 30, 40), value, dtype=dtype)
    offset, scale = normalization_params(image, normalization_spec(mode))
    assert np.all(scale > 0) and np.all(np.isfinite(scale))
    out = normalize(image, normalization_spec(mode))
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
    with pytest.raises(ValueError, match="re-ingest"):
        normalization_spec("dataset", metadata={"classes": [0, 1]})
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        normalization_params(np.zeros((8, 8)), normalization_spec("zscore"))
    bad = np.zeros((1, 8, 8), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        normalization_params(bad, normalization_spec("zscore"))

"""Tests of scarce.data.augment: the single-warp image/mask contract, limits, dtypes, borders."""

from __future__ import annotations

import faulthandler

import cv2
import numpy as np
import pytest

from scarce.config import AugmentConfig, ConfigError
from scarce.data.augment import (
    AugmentParams,
    Cutout,
    apply_photometric,
    augment_patch,
    crop_patch,
    draw_params,
    sampling_grid,
)
from tests.shared import SHARED_DATA

DATA = SHARED_DATA
P = 96  # patch side used by most tests (small: fast)
GEOMETRY_ONLY = dict(noise=False, blur=False, intensity=False, gamma=False)
ELASTIC = AugmentConfig(elastic=True, elastic_sigma=6.0, **GEOMETRY_ONLY)


def coordinate_image(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(2, H, W) float32 image of its own (y, x) and int32 labels > 65535 from 8 px blocks."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    labels = (yy // 8 * 100 + xx // 8).astype(np.int32) + 70_000
    return np.stack([yy, xx]), labels


def reflect101(coords: np.ndarray, n: int) -> np.ndarray:
    """Reference REFLECT_101 of (possibly far outside) coordinates into [0, n - 1]."""
    period = 2 * (n - 1)
    c = np.mod(coords, period)
    return np.where(c > n - 1, period - c, c)


def geometry_only(params: AugmentParams) -> AugmentParams:
    return AugmentParams(
        params.flip_x, params.flip_y, params.angle, params.shift, params.scale, params.elastic
    )


def test_coordinate_image_follows_grid_and_mask_moves_identically():
    image, labels = coordinate_image(300, 340)
    rng = np.random.default_rng(1)
    flips = set()
    for _ in range(25):
        centre = (rng.uniform(0, 300), rng.uniform(0, 340))
        params = draw_params(ELASTIC, P, rng)
        flips.add((params.flip_y, params.flip_x))
        patch, mask = augment_patch(image, labels, centre, P, ELASTIC, rng, params=params)
        gy, gx = sampling_grid(params, P, centre)
        inside = (gy >= 1) & (gy <= 298) & (gx >= 1) & (gx <= 338)
        # linear interpolation of a ramp is exact; remap quantises coordinates to 1/32 px
        assert np.abs(patch[0] - gy)[inside].max() < 0.02
        assert np.abs(patch[1] - gx)[inside].max() < 0.02
        # nearest: the label of the rounded coordinate (reflected at the border)
        ry = reflect101(np.rint(gy), 300).astype(int)
        rx = reflect101(np.rint(gx), 340).astype(int)
        frac_y, frac_x = np.abs(gy - np.rint(gy)), np.abs(gx - np.rint(gx))
        clear = (frac_y < 0.49) & (frac_x < 0.49)  # away from rounding ties
        assert mask.dtype == np.int32
        np.testing.assert_array_equal(mask[clear], labels[ry, rx][clear])
    assert len(flips) == 4  # every flip combination occurred and passed


def test_each_geometric_parameter_means_what_it_says():
    """Exact expectations on the coordinate image: flips, 90 degrees, scale, shift, elastic."""
    image, _ = coordinate_image(200, 200)
    q = np.arange(P, dtype=np.float32) - P // 2
    qy, qx = np.meshgrid(q, q, indexing="ij")
    elastic = np.zeros((3, 3, 2), np.float32)
    elastic[..., 0], elastic[..., 1] = 3.0, -2.0  # a constant field is a plain translation
    cases = [
        (AugmentParams(flip_x=True), 100 + qy, 100 - qx),
        (AugmentParams(flip_y=True), 100 - qy, 100 + qx),
        (AugmentParams(angle=90.0), 100 - qx, 100 + qy),
        (AugmentParams(scale=(2.0, 0.5)), 100 + qy / 2, 100 + qx * 2),
        (AugmentParams(shift=(5.0, -7.0)), 105 + qy, 93 + qx),
        (AugmentParams(elastic=elastic), 103 + qy, 98 + qx),
    ]
    for params, want_y, want_x in cases:
        patch, _ = augment_patch(image, None, (100, 100), P, ELASTIC, None, params=params)
        np.testing.assert_allclose(patch[0], want_y, atol=0.02, err_msg=str(params))
        np.testing.assert_allclose(patch[1], want_x, atol=0.02, err_msg=str(params))


def test_reflection_far_outside_small_image():
    """A 40 x 40 image into a 160 patch: coordinates are reflected several times over."""
    image, labels = coordinate_image(40, 40)
    cfg = AugmentConfig(**GEOMETRY_ONLY, scale_fraction=0.3)
    rng = np.random.default_rng(2)
    for _ in range(10):
        params = draw_params(cfg, 160, rng)
        patch, mask = augment_patch(image, labels, (20.0, 20.0), 160, cfg, rng, params=params)
        gy, gx = sampling_grid(params, 160, (20.0, 20.0))
        assert gy.min() < -40 and gy.max() > 80  # really far outside
        assert np.abs(patch[0] - reflect101(gy, 40)).max() < 0.02
        assert np.abs(patch[1] - reflect101(gx, 40)).max() < 0.02
        ry, rx = reflect101(np.rint(gy), 40).astype(int), reflect101(np.rint(gx), 40).astype(int)
        clear = (np.abs(gy - np.rint(gy)) < 0.49) & (np.abs(gx - np.rint(gx)) < 0.49)
        np.testing.assert_array_equal(mask[clear], labels[ry, rx][clear])


def _fold(i: np.ndarray, n: int) -> np.ndarray:
    return np.zeros_like(i, dtype=int) if n == 1 else reflect101(i, n).astype(int)


def keys_cubic_reflect101(plane: np.ndarray, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """Reference: Keys bicubic (a = -0.75, OpenCV's) of a REFLECT_101-extended (H, W) plane."""

    def weights(t):  # taps at floor - 1, floor, floor + 1, floor + 2
        d = np.abs(np.stack([t + 1, t, 1 - t, 2 - t]).astype(np.float64))
        a = -0.75
        return np.where(
            d <= 1, (a + 2) * d**3 - (a + 3) * d**2 + 1, a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
        )

    y0, x0 = np.floor(gy), np.floor(gx)
    wy, wx = weights(gy - y0), weights(gx - x0)
    out = np.zeros(gy.shape)
    for i in range(4):
        for j in range(4):
            taps = plane[_fold(y0 + i - 1, plane.shape[0]), _fold(x0 + j - 1, plane.shape[1])]
            out += wy[i] * wx[j] * taps
    return out


def bilinear_reflect101(plane: np.ndarray, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """Reference: bilinear interpolation of a REFLECT_101-extended (H, W) plane."""
    y0, x0 = np.floor(gy), np.floor(gx)
    ty, tx = gy - y0, gx - x0
    out = np.zeros(gy.shape)
    for i, wy in ((0, 1 - ty), (1, ty)):
        for j, wx in ((0, 1 - tx), (1, tx)):
            out += wy * wx * plane[_fold(y0 + i, plane.shape[0]), _fold(x0 + j, plane.shape[1])]
    return out


@pytest.mark.parametrize("interpolation", ["linear", "cubic"])
@pytest.mark.parametrize("shape", [(40, 30), (1, 9), (7, 1)])
def test_reflection_far_outside_matches_reference(shape, interpolation):
    """Patches of tiny images reach several reflections out (and OpenCV 5.0.0's cubic remap
    misreads beyond one, and hangs on a 1-pixel axis): augment_patch pads the cut region by
    reflection, so remap reads only inside it; compare with references that fold every tap."""
    rng = np.random.default_rng(14)
    image = cv2.GaussianBlur(rng.random(shape, dtype=np.float32), (0, 0), 2.0)
    image = image.reshape(shape)[None] * 1000
    labels = rng.integers(0, 2**31, shape, dtype=np.int64)
    cfg = AugmentConfig(interpolation=interpolation, **GEOMETRY_ONLY)
    reference = keys_cubic_reflect101 if interpolation == "cubic" else bilinear_reflect101
    faulthandler.dump_traceback_later(30, exit=True)  # a hang inside OpenCV: fail, loudly
    try:
        for _ in range(5):
            centre = (float(rng.integers(shape[0])), float(rng.integers(shape[1])))
            params = draw_params(cfg, 96, rng)
            patch, mask = augment_patch(image, labels, centre, 96, cfg, rng, params=params)
            gy, gx = sampling_grid(params, 96, centre)
            assert any(
                g.min() < -n or g.max() > 2 * n  # beyond one reflection
                for g, n in ((gy, shape[0]), (gx, shape[1]))
            )
            err = np.abs(patch[0] - reference(image[0], gy, gx)).max()
            assert err < 1e-3 * max(np.ptp(image), 1e-3), err
            ry, rx = _fold(np.rint(gy), shape[0]), _fold(np.rint(gx), shape[1])
            clear = (np.abs(gy - np.rint(gy)) < 0.49) & (np.abs(gx - np.rint(gx)) < 0.49)
            np.testing.assert_array_equal(mask[clear], labels[ry, rx][clear])
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.mark.parametrize("interpolation", ["linear", "cubic"])
def test_region_remap_equals_whole_image_remap(interpolation):
    rng = np.random.default_rng(3)
    noise = rng.random((3, 200, 260), dtype=np.float32)
    smooth = np.stack([cv2.GaussianBlur(c, (0, 0), 4.0) for c in noise])
    image = np.round(4095 * (smooth - smooth.min()) / np.ptp(smooth)).astype(np.uint16)
    labels = rng.integers(0, 2**31, (200, 260), dtype=np.int64).astype(np.uint32)
    offset, scale = np.array([10, 2000, 0], np.float32), np.array([300, 50, 1], np.float32)
    cfg = AugmentConfig(elastic=True, interpolation=interpolation, **GEOMETRY_ONLY)
    whole = (image.astype(np.float32) - offset[:, None, None]) / scale[:, None, None]
    centres = [
        (0.0, 0.0),
        (199.0, 259.0),
        (100.0, 5.0),
        (190.0, 130.0),
        (100.2, 130.7),
        (-30.0, 280.0),
    ]
    for centre in centres:
        params = draw_params(cfg, P, rng)
        patch, mask = augment_patch(
            image, labels, centre, P, cfg, rng, offset=offset, scale=scale, params=params
        )
        gy, gx = sampling_grid(params, P, centre)
        flag = cv2.INTER_LINEAR if interpolation == "linear" else cv2.INTER_CUBIC
        for c in range(3):
            ref = cv2.remap(whole[c], gx, gy, flag, borderMode=cv2.BORDER_REFLECT_101)
            err = np.abs(patch[c] - ref).max() / np.ptp(whole[c])
            assert err < 1e-4, (centre, c)  # of the channel's range (measured ~2e-6)
        ref_mask = labels[
            reflect101(np.rint(gy), 200).astype(int), reflect101(np.rint(gx), 260).astype(int)
        ]
        clear = (np.abs(gy - np.rint(gy)) < 0.49) & (np.abs(gx - np.rint(gx)) < 0.49)
        np.testing.assert_array_equal(mask[clear], ref_mask[clear])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.uint32, np.int64])
def test_labels_never_gain_values(dtype):
    rng = np.random.default_rng(4)
    cfg = AugmentConfig(elastic=True, elastic_sigma=15.0, interpolation="cubic")
    high = min(np.iinfo(dtype).max, 2**40)
    values = rng.integers(0, high, 6, dtype=np.int64).astype(dtype)
    for shape in [(150, 170), (30, 50)]:
        blocks = values[rng.integers(0, 6, (shape[0] // 5 + 1, shape[1] // 5 + 1))]
        labels = np.repeat(np.repeat(blocks, 5, 0), 5, 1)[: shape[0], : shape[1]]
        image = rng.random((1, *shape), dtype=np.float32)
        for _ in range(30):
            centre = (rng.uniform(-20, shape[0] + 20), rng.uniform(-20, shape[1] + 20))
            _, mask = augment_patch(image, labels, centre, 64, cfg, rng)
            assert mask.dtype == labels.dtype and mask.shape == (64, 64)
            assert set(np.unique(mask)) <= set(np.unique(labels))


def test_parameters_stay_within_limits_over_1000_draws():
    cfg = AugmentConfig(
        rotation_degrees=(-30.0, 45.0),
        jitter_fraction=0.2,
        scale_fraction=0.25,
        elastic=True,
        elastic_grid=4,
        blur_max_sigma=1.5,
        noise_p=0.3,
        intensity=True,
        intensity_fraction=0.1,
        gamma=True,
        gamma_p=0.6,
        cutout_missing=True,
        cutout_contrast=True,
        cutout_noise=True,
        cutout_p=0.4,
        cutout_max_fraction=0.2,
    )
    rng = np.random.default_rng(5)
    draws = [draw_params(cfg, 128, rng) for _ in range(1000)]
    angles = np.array([d.angle for d in draws])
    shifts = np.array([d.shift for d in draws])
    scales = np.array([d.scale for d in draws])
    assert angles.min() >= -30 and angles.max() <= 45 and np.ptp(angles) > 70
    assert np.abs(shifts).max() <= 0.2 * 128 and np.abs(shifts).max() > 0.19 * 128
    assert scales.min() >= 0.75 and scales.max() <= 1.25 and np.ptp(scales) > 0.45
    assert all(d.elastic.shape == (4, 4, 2) and d.elastic.dtype == np.float32 for d in draws)
    assert 8.5 < np.std([d.elastic for d in draws]) < 11.5  # elastic_sigma = 10 px
    blurs = [d.blur_sigma for d in draws if d.blur_sigma is not None]
    assert 0 <= min(blurs) and max(blurs) <= 1.5
    gains = np.array([d.intensity for d in draws if d.intensity is not None])
    assert np.abs(gains[:, 0]).max() <= 0.1 and np.abs(gains[:, 1] - 1).max() <= 0.1
    gammas = [d.gamma for d in draws if d.gamma is not None]
    assert 0.7 <= min(gammas) and max(gammas) <= 1.5
    cuts = [c for d in draws for c in d.cutouts]
    assert all(
        1 <= c.h <= 26 and 1 <= c.w <= 26 and c.y0 + c.h <= 128 and c.x0 + c.w <= 128 for c in cuts
    )
    assert all(0.5 <= c.value <= 2.0 for c in cuts if c.kind == "contrast")
    rates = [  # observed frequency vs configured probability (binomial sd <= 0.016)
        (0.5, [d.flip_x for d in draws]),
        (0.5, [d.flip_y for d in draws]),
        (0.3, [d.noise_sigma is not None for d in draws]),
        (0.6, [d.gamma is not None for d in draws]),
    ]
    for p, hits in rates:
        assert abs(np.mean(hits) - p) < 0.06
    for kind in ("missing", "contrast", "noise"):
        assert abs(np.mean([any(c.kind == kind for c in d.cutouts) for d in draws]) - 0.4) < 0.06


def test_switches_off_give_identity_values():
    cfg = AugmentConfig(
        flip_x_p=0.0,
        flip_y_p=0.0,
        rotation=False,
        jitter=False,
        scale=False,
        noise=False,
        blur=False,
    )
    rng = np.random.default_rng(6)
    for _ in range(50):
        d = draw_params(cfg, 64, rng)
        assert (d.flip_x, d.flip_y, d.angle, d.shift, d.scale) == (
            False,
            False,
            0.0,
            (0, 0),
            (1, 1),
        )
        assert d.elastic is d.noise_sigma is d.blur_sigma is d.intensity is d.gamma is None
        assert d.cutouts == ()


def test_n_channel_uint16_and_float32_agree():
    rng = np.random.default_rng(7)
    image16 = rng.integers(0, 65535, (5, 120, 130), dtype=np.uint16)
    image16.setflags(write=False)  # like an LMDB buffer view
    image32 = image16.astype(np.float32)
    offset = image32.mean(axis=(1, 2))
    scale = image32.std(axis=(1, 2))
    for interpolation in ("linear", "cubic"):
        cfg = AugmentConfig(elastic=True, interpolation=interpolation, **GEOMETRY_ONLY)
        params = draw_params(cfg, P, rng)
        a, _ = augment_patch(
            image16, None, (60, 65), P, cfg, rng, offset=offset, scale=scale, params=params
        )
        b, _ = augment_patch(
            image32, None, (60, 65), P, cfg, rng, offset=offset, scale=scale, params=params
        )
        assert a.shape == (5, P, P) and a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
        for c in (0, 4):  # channel groups of 4 and 1 warp like a single channel
            single, _ = augment_patch(
                image16[c : c + 1],
                None,
                (60, 65),
                P,
                cfg,
                rng,
                offset=offset[c : c + 1],
                scale=scale[c : c + 1],
                params=params,
            )
            np.testing.assert_allclose(a[c], single[0], rtol=1e-5, atol=1e-4)


def test_same_seed_same_patch_and_different_seed_differs():
    image, labels = coordinate_image(150, 150)
    cfg = AugmentConfig(elastic=True, cutout_noise=True, cutout_p=1.0)

    def run(seed):
        rng = np.random.default_rng(seed)
        return augment_patch(image, labels, (75.0, 75.0), P, cfg, rng)

    (a, ma), (b, mb), (c, _) = run(11), run(11), run(12)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    assert not np.array_equal(a, c)


def test_disabled_is_exact_crop_with_reflection():
    rng = np.random.default_rng(8)
    image = rng.integers(0, 2**32 - 1, (2, 70, 90), dtype=np.uint32)
    labels = rng.integers(0, 2**32 - 1, (70, 90), dtype=np.uint32)
    cfg = AugmentConfig(enabled=False)
    patch, mask = augment_patch(image, labels, (35, 45), 32, cfg, rng)
    np.testing.assert_array_equal(patch, image[:, 19:51, 29:61].astype(np.float32))
    np.testing.assert_array_equal(mask, labels[19:51, 29:61])
    padded = np.pad(image, ((0, 0), (100, 100), (100, 100)), mode="reflect")
    padded_labels = np.pad(labels, 100, mode="reflect")
    for centre in [(0.0, 0.0), (69.4, 3.0), (-50.0, 130.0)]:  # 0.4 rounds down
        patch, mask = crop_patch(image, labels, centre, 64)
        y0, x0 = int(np.floor(centre[0] + 0.5)) - 32 + 100, int(np.floor(centre[1] + 0.5)) + 68
        np.testing.assert_array_equal(
            patch, padded[:, y0 : y0 + 64, x0 : x0 + 64].astype(np.float32)
        )
        np.testing.assert_array_equal(mask, padded_labels[y0 : y0 + 64, x0 : x0 + 64])


def test_identity_warp_at_integer_centre_equals_crop():
    rng = np.random.default_rng(9)
    image = rng.random((1, 80, 80), dtype=np.float32)
    labels = rng.integers(0, 9, (80, 80), dtype=np.uint8)
    for interpolation in ("linear", "cubic"):
        cfg = AugmentConfig(interpolation=interpolation)
        warped = augment_patch(image, labels, (10, 70), 48, cfg, rng, params=AugmentParams())
        cropped = crop_patch(image, labels, (10, 70), 48)
        np.testing.assert_allclose(warped[0], cropped[0], atol=1e-6)
        np.testing.assert_array_equal(warped[1], cropped[1])


def test_photometric_touches_image_only_and_keeps_channels_apart():
    image, labels = coordinate_image(120, 120)
    rng = np.random.default_rng(10)
    geometric = draw_params(ELASTIC, P, rng)
    full = AugmentParams(
        **{
            **geometric.__dict__,
            "noise_sigma": 0.05,
            "blur_sigma": 2.0,
            "gamma": 1.3,
            "cutouts": (Cutout("missing", 5, 5, 20, 20, 0.0),),
        }
    )
    _, mask_a = augment_patch(image, labels, (60, 60), P, ELASTIC, rng, params=geometric)
    _, mask_b = augment_patch(image, labels, (60, 60), P, ELASTIC, rng, params=full)
    np.testing.assert_array_equal(mask_a, mask_b)

    patch = np.zeros((2, 65, 65), np.float32)
    patch[0, 32, 32] = 1.0  # an impulse in channel 0, channel 1 flat
    apply_photometric(patch, AugmentParams(blur_sigma=2.0), rng)
    assert np.all(patch[1] == 0.0)  # blur never mixes channels
    yy = np.arange(65)[:, None] - 32
    assert patch[0].sum() == pytest.approx(1.0, rel=1e-3)
    assert (patch[0] * yy**2).sum() == pytest.approx(4.0, rel=0.05)  # variance = sigma**2


def test_errors_say_what_is_wrong():
    rng = np.random.default_rng(12)
    image = np.zeros((1, 40, 40), np.float32)
    labels = np.zeros((40, 40), np.uint8)
    cfg = AugmentConfig()
    with pytest.raises(TypeError, match="float64"):
        augment_patch(image.astype(np.float64), labels, (20, 20), 32, cfg, rng)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        augment_patch(image[0], labels, (20, 20), 32, cfg, rng)
    with pytest.raises(ValueError, match="mask"):
        augment_patch(image, labels[:30], (20, 20), 32, cfg, rng)
    with pytest.raises(ValueError, match="one per channel"):
        augment_patch(image, labels, (20, 20), 32, cfg, rng, offset=[1.0, 2.0])
    with pytest.raises(ValueError, match="scale must be > 0"):
        augment_patch(image, labels, (20, 20), 32, cfg, rng, scale=[0.0])
    with pytest.raises(ConfigError, match="flip_x_p"):
        draw_params(AugmentConfig(flip_x_p=1.5), 32, rng)
    with pytest.raises(ConfigError, match="scale_fraction"):
        draw_params(AugmentConfig(scale_fraction=1.0), 32, rng)


def test_real_nuclei_stay_under_their_mask():
    """BBBC039: nuclei are bright; after augmentation the mask still covers the bright pixels."""
    folder = DATA / "bbbc039"
    if not (folder / "images").is_dir():
        pytest.skip(f"BBBC039 data not found at {folder}")
    from scarce.io import read_image, read_mask

    name = sorted((folder / "images").iterdir())[0].name
    image, labels = read_image(folder / "images" / name), read_mask(folder / "masks" / name)
    offset = np.array([image.mean()], np.float32)
    scale = np.array([image.std()], np.float32)
    cfg = AugmentConfig(elastic=True, noise=False, blur=False)
    rng = np.random.default_rng(13)
    contrasts = []
    for _ in range(20):
        centre = (rng.uniform(0, image.shape[1]), rng.uniform(0, image.shape[2]))
        patch, mask = augment_patch(
            image, labels, centre, 128, cfg, rng, offset=offset, scale=scale
        )
        assert set(np.unique(mask)) <= set(np.unique(labels))
        if 0.05 < (mask > 0).mean() < 0.95:
            inner = cv2.erode((mask > 0).astype(np.uint8), np.ones((3, 3))) > 0
            outer = cv2.dilate((mask > 0).astype(np.uint8), np.ones((5, 5))) == 0
            contrasts.append(patch[0][inner].mean() - patch[0][outer].mean())
    assert len(contrasts) >= 8
    assert min(contrasts) > 1.0  # nuclei at least 1 image-std brighter than background

"""The field network's parts: cost volume, soft-argmax, robust affine fit, identity start."""

from __future__ import annotations

import pytest
import torch

from scarce.errors import InputError
from scarce.models import build_model
from scarce.models.fieldnet import FieldNet, fieldnet_receptive_field
from scarce.models.matching import (
    correlation,
    expected_offset,
    gaussian_smooth,
    robust_affine,
)


def test_cost_volume_and_soft_argmax_find_a_known_shift():
    torch.manual_seed(0)
    source = torch.randn(1, 8, 40, 40)
    target = torch.roll(source, shifts=(-1, 2), dims=(2, 3))  # target(y, x) = source(y+1, x-2)
    cost = correlation(source, target, 3)
    assert cost.shape == (1, 49, 40, 40)
    soft_argmax = expected_offset(torch.softmax(50.0 * cost, dim=1), 3)
    found = soft_argmax[0, :, 8:-8, 8:-8].mean(dim=(1, 2))
    torch.testing.assert_close(found, torch.tensor([1.0, -2.0]), atol=0.01, rtol=0)


def test_robust_affine_ignores_outliers():
    h = w = 32
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    affine = torch.stack([2 * yy + 3, -xx + 1])[None]
    noisy = affine.clone()
    noisy[:, :, :8, :8] += 20.0  # a look-alike structure matched far away
    fit = robust_affine(noisy, torch.ones(1, 1, h, w))
    assert (fit - affine).abs().max() < 0.1
    plain = robust_affine(noisy, torch.ones(1, 1, h, w), iterations=0)  # least squares only
    assert (plain - affine).abs().max() > 1.0


def test_normalised_convolution_trusts_confident_pixels():
    field = torch.zeros(1, 2, 16, 16)
    field[:, :, 8, 8] = 100.0  # one wild match
    weight = torch.ones(1, 1, 16, 16)
    weight[:, :, 8, 8] = 1e-6  # ... with no confidence
    assert gaussian_smooth(field, weight, 2.0).abs().max() < 1e-2


def test_untrained_network_without_cost_volume_is_the_identity():
    net = FieldNet(levels=3, encoder_widths=(4, 4, 4), aligner_widths=(4,), kernel_size=3)
    x = torch.rand(2, 1, 32, 32)
    assert not net.field(x, torch.rand(2, 1, 32, 32)).any()
    assert net.receptive_field == fieldnet_receptive_field(3, 3, 1)
    with pytest.raises(InputError, match="not a multiple of 4"):
        net(torch.rand(1, 1, 30, 32), torch.rand(1, 1, 30, 32))


def test_options_shape_the_pyramid_and_rebuild_from_arguments():
    net = build_model(
        "fieldnet",
        1,
        levels=4,
        encoder_widths=[4, 6, 8, 10],
        aligner_widths=[6],
        kernel_size=3,
        finest_level=2,
        correlation_radius=1,
        input_level=1,
        match_channels=3,
        coarse_affine=True,
    ).eval()
    enc = net.encode(torch.rand(1, 1, 64, 64))
    assert enc[0] is None and enc[1].shape == (1, 6, 32, 32) and enc[3].shape == (1, 10, 8, 8)
    with torch.no_grad():
        fields = net(torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64))
    assert sorted(fields) == [2, 3] and fields[2].shape == (1, 2, 16, 16)
    again = build_model("fieldnet", **net.arguments)
    assert again.arguments == net.arguments
    with pytest.raises(InputError, match="input_level"):
        FieldNet(levels=3, finest_level=0, input_level=1)


def test_without_refinement_a_level_is_its_smoothed_match():
    net = build_model(
        "fieldnet",
        1,
        levels=3,
        encoder_widths=[4, 4, 4],
        kernel_size=3,
        correlation_radius=1,
        refine=False,
        coarse_affine=True,
    )
    assert all(isinstance(a, torch.nn.Identity) for a in net.aligners)
    names = {n.split(".")[0] for n, _ in net.named_parameters()}
    assert names == {"encoder"}  # only the Siamese encoder learns
    with torch.no_grad():
        out = net(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
    assert sorted(out) == [0, 1, 2] and torch.isfinite(out[0]).all()


def test_cost_volume_equals_the_dot_product_at_every_offset():
    torch.manual_seed(1)
    source, target = torch.randn(2, 5, 12, 14), torch.randn(2, 5, 12, 14)
    r = 2
    s = torch.nn.functional.normalize(source, dim=1)
    t = torch.nn.functional.normalize(target, dim=1)
    padded = torch.nn.functional.pad(s, (r,) * 4)
    expected = torch.stack(
        [
            (padded[:, :, r + dy : r + dy + 12, r + dx : r + dx + 14] * t).sum(1)
            for dy in range(-r, r + 1)
            for dx in range(-r, r + 1)
        ],
        1,
    )
    torch.testing.assert_close(correlation(source, target, r), expected)


def test_more_finest_passes_shrink_the_error_on_a_smoothly_deformed_em_slice(shared_data):
    """A real ISBI slice against a smoothly deformed copy (affine + bump, up to 6 px): each
    further matching pass at the finest level leaves less error (random encoder weights: the
    cosine cost volume of any features still matches texture)."""
    from scarce.align.evaluate import composition_error
    from scarce.io import read_image
    from scarce.models.field import warp

    image = read_image(shared_data / "isbi2012" / "images" / "03.png")[0, :192, :192]
    target = torch.from_numpy(image.astype("float32") / 255.0)[None, None]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 192), torch.linspace(-1, 1, 192), indexing="ij")
    bump = torch.exp(-((yy - 0.2) ** 2 + (xx + 0.1) ** 2) / 0.3)
    truth = torch.stack([2.0 * xx + 3.0 * bump + 1.0, -2.0 * yy + 2.0 * bump])[None]
    source = warp(target, truth)  # the known deformation u that made the source
    ratios = []
    for seed in range(5):  # random encoders: judge the mean over several
        errors = []
        for passes in (1, 3):
            torch.manual_seed(seed)
            net = FieldNet(
                levels=3,
                finest_level=1,
                correlation_radius=2,
                smoothing=16.0,
                refine=False,
                finest_iterations=passes,
            ).eval()
            with torch.no_grad():
                field = net.field(source, target)
            errors.append(float(composition_error(field, truth)[0, 16:-16, 16:-16].mean()))
        ratios.append(errors[1] / errors[0])
    assert sum(ratios) / len(ratios) < 0.9 and max(ratios) < 1.0, ratios
    with pytest.raises(InputError, match="finest_iterations"):
        FieldNet(levels=3, finest_iterations=0)


def test_a_crack_mask_keeps_the_two_sides_apart(shared_data):
    """A real ISBI slice torn by a synthetic 8 px crack: with the crack masked the field is
    averaged per side, and away from the crack it is far closer to the truth."""
    import numpy as np

    from scarce.align.defects import crack
    from scarce.align.evaluate import composition_error
    from scarce.io import read_image

    image = read_image(shared_data / "isbi2012" / "images" / "03.png")[0, :192, :192]
    image = ((image - image.mean()) / image.std()).astype("float32")
    damage = crack(image, np.random.default_rng(0), width=8.0)
    source, target = torch.from_numpy(damage.image)[None, None], torch.from_numpy(image)[None, None]
    usable = torch.from_numpy((damage.mask == 0).astype("float32"))[None, None]
    defect = torch.from_numpy((damage.mask > 0).astype("float32"))[None, None]
    keep = torch.nn.functional.max_pool2d(defect, 9, 1, 4)[0, 0] == 0  # 4 px from the crack
    keep[:16], keep[-16:], keep[:, :16], keep[:, -16:] = False, False, False, False
    ratios = []
    for seed in range(5):  # random encoders: judge the mean over several
        errors = []
        for masks in (None, (usable, torch.ones_like(usable))):
            torch.manual_seed(seed)
            net = FieldNet(levels=3, correlation_radius=3, smoothing=24.0, refine=False).eval()
            with torch.no_grad():
                field = net.field(source, target, *(masks or ()))
            truth = torch.from_numpy(damage.field)[None]
            errors.append(float(composition_error(field, truth)[0][keep].mean()))
        ratios.append(errors[1] / errors[0])
    assert sum(ratios) / len(ratios) < 0.8 and max(ratios) < 1.0, ratios
    with pytest.raises(InputError, match="both"):
        net.field(source, target, usable)
    with pytest.raises(InputError, match="must be"):
        net.field(source, target, usable[0], usable[0])  # (1, H, W): no channel axis
    no_cost_volume = FieldNet(levels=3, encoder_widths=(4, 4, 4), aligner_widths=(4,))
    with pytest.raises(InputError, match="cost volume"):
        no_cost_volume.field(source, target, usable, usable)
    double = net.field(source, target, usable.double(), torch.ones_like(usable).double())
    assert double.dtype == torch.float32 and torch.isfinite(double).all()

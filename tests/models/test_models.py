"""Tests for scarce.models: shapes, size errors, registry, receptive fields, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scarce.io import list_image_files, read_image, read_mask
from scarce.models import MODELS, SegNet, UNet, build_model
from scarce.models.blocks import group_count
from scarce.models.fieldnet import FieldNet
from scarce.models.receptive import measure_receptive_field
from scarce.models.segnet import MaxUnpool2x2, segnet_receptive_field
from scarce.models.unet import unet_receptive_field
from scarce.segment.losses import SegmentationLoss
from tests.shared import SHARED_DATA

DATA = SHARED_DATA
SEGMENTATION = ("segnet", "unet")  # the registry's segmentation networks
TRAINER_OPTIONS = dict(
    depth=4, width=4, widths=None, norm="batch", dropout=0.0, upsampling="transpose"
)


@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
def test_unet_output_shape(norm, upsampling):
    torch.manual_seed(0)
    model = UNet(3, 5, depth=3, width=4, norm=norm, dropout=0.1, upsampling=upsampling)
    out = model(torch.randn(2, 3, 64, 48))
    assert out.shape == (2, 5, 64, 48)
    assert out.dtype == torch.float32
    assert (model.size_multiple, model.halo) == (8, model.receptive_field // 2)


@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
@pytest.mark.parametrize("depth", [4, 5])
def test_segnet_output_shape(norm, depth):
    torch.manual_seed(0)
    model = SegNet(2, 3, depth=depth, width=4, norm=norm)
    out = model(torch.randn(2, 2, 64, 96))
    assert out.shape == (2, 3, 64, 96)
    assert model.size_multiple == 2**depth


def test_unet_widths_set_every_level():
    model = UNet(1, 2, depth=3, width=99, widths=(8, 8, 16, 24))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    encoder_out = [block[-1][0].out_channels for block in model.encoder]
    assert encoder_out == [8, 8, 16] and model.bottleneck[-1][0].out_channels == 24
    assert convs[-1].in_channels == 8  # the 1x1 head reads the full-resolution level
    assert model(torch.randn(2, 1, 32, 40)).shape == (2, 2, 32, 40)
    again = build_model("unet", 1, 2, **model.options)  # options rebuild it (checkpoints)
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    with pytest.raises(ValueError, match=r"widths must be depth \+ 1 = 4 positive integers"):
        UNet(1, 2, depth=3, widths=(8, 16, 32))
    with pytest.raises(ValueError, match="widths must be"):
        UNet(1, 2, depth=1, widths=(8, 0))


def test_segnet_follows_vgg_stages():
    model = SegNet(1, 2, depth=5, width=64)
    convs = [
        [m for m in stage.modules() if isinstance(m, torch.nn.Conv2d)] for stage in model.encoder
    ]
    assert [len(c) for c in convs] == [2, 2, 3, 3, 3]
    assert [c[-1].out_channels for c in convs] == [64, 128, 256, 512, 512]


def test_size_error_names_nearest_valid_sizes():
    model = UNet(1, 2, depth=4, width=4)
    with pytest.raises(ValueError, match=r"70x64.*multiple of 16.*64 or 80"):
        model(torch.zeros(1, 1, 70, 64))
    with pytest.raises(ValueError, match=r"width 12 -> nearest valid 16"):
        SegNet(1, 2, depth=4, width=4)(torch.zeros(1, 1, 32, 12))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\); got shape \(1, 3, 32, 32\)"):
        model(torch.zeros(1, 3, 32, 32))


def test_registry_and_build_model_errors():
    assert MODELS == {"unet": UNet, "segnet": SegNet, "fieldnet": FieldNet}
    with pytest.raises(ValueError, match=r"'vnet'.*\['fieldnet', 'segnet', 'unet'\]"):
        build_model("vnet", 1, 2)
    with pytest.raises(ValueError, match=r"\['bogus'\].*valid options are \['depth', 'norm'"):
        build_model("segnet", 1, 2, bogus=3)
    with pytest.raises(ValueError, match="norm = 'layer'"):
        build_model("unet", 1, 2, norm="layer")
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        build_model("unet", 1, 2, depth=0)


@pytest.mark.parametrize("name", SEGMENTATION)
def test_build_model_takes_trainer_options_and_rebuilds_from_options(name, caplog):
    model = build_model(name, 2, 3, **TRAINER_OPTIONS)
    assert (model.in_channels, model.num_classes, model.size_multiple) == (2, 3, 16)
    assert not caplog.records  # default dropout/upsampling are dropped silently for SegNet
    again = build_model(name, 2, 3, **model.options)
    assert again.options == model.options
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in again.state_dict().items()}


def test_build_model_warns_when_dropping_a_non_default_option(caplog):
    model = build_model("segnet", 1, 2, depth=4, width=4, dropout=0.3)
    assert "dropout" not in model.options
    assert any("no option 'dropout'" in r.getMessage() for r in caplog.records)


def test_group_count_divides_channels():
    assert [group_count(c) for c in (4, 8, 12, 32, 64, 3)] == [4, 8, 6, 8, 8, 3]


def test_max_unpool_matches_torch():
    x = torch.randn(2, 3, 8, 12)
    pooled, idx = torch.nn.functional.max_pool2d_with_indices(x, 2, 2)
    expected = torch.nn.MaxUnpool2d(2, stride=2)(pooled, idx)
    assert torch.equal(MaxUnpool2x2()(pooled, idx), expected)


def _positive_copy(model):
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    return model


@pytest.mark.parametrize("upsampling,expected", [("transpose", 100), ("bilinear", 116)])
def test_unet_receptive_field_matches_gradient_measurement(upsampling, expected):
    torch.manual_seed(0)
    model = UNet(1, 2, depth=3, width=4, upsampling=upsampling)
    assert model.receptive_field == unet_receptive_field(3, upsampling) == expected
    measured = measure_receptive_field(model, 1)
    assert model.receptive_field / 2 < measured <= model.receptive_field
    # with positive weights no ReLU cuts a path: every phase together reaches the full window
    positive = measure_receptive_field(_positive_copy(model), 1, all_phases=True)
    assert positive == model.receptive_field


@pytest.mark.parametrize("depth", [3, 4])
def test_segnet_receptive_field_bounds_measurement(depth):
    torch.manual_seed(0)
    model = SegNet(1, 2, depth=depth, width=4)
    assert model.receptive_field == segnet_receptive_field(depth)
    measured = measure_receptive_field(model, 1, all_phases=True)
    assert model.receptive_field / 2 < measured <= model.receptive_field


def test_measure_receptive_field_ignores_norm_statistics_and_keeps_model():
    torch.manual_seed(0)
    model = UNet(1, 2, depth=2, width=4, norm="instance").train()
    measured = measure_receptive_field(model, 1, size=96)
    assert measured <= model.receptive_field < 96
    assert model.training  # the model passed in is untouched
    assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in model.modules())


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("name", SEGMENTATION)
def test_scripted_and_traced_models_accept_other_sizes(name):
    torch.manual_seed(0)
    model = build_model(name, 1, 2, depth=3, width=4).eval()
    x = torch.randn(2, 1, 48, 80)
    scripted = torch.jit.script(model)
    traced = torch.jit.trace(model, torch.randn(1, 1, 32, 32))
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(scripted(x), expected, atol=1e-5)
        assert torch.allclose(traced(x), expected, atol=1e-5)


def _nist_patches(count: int, size: int = 64):
    """``count`` z-scored (image, mask) patches from nist_rpe, each the window (stride 32)
    whose foreground fraction is closest to one half, so both classes matter."""
    root = DATA / "nist_rpe"
    if not root.is_dir():
        pytest.skip(f"real data not found at {root}")
    images, masks = [], []
    for path in list_image_files(root / "images")[:count]:
        image = read_image(path).astype(np.float32)
        mask = read_mask(root / "masks" / path.name)
        image = (image - image.mean()) / (image.std() + 1e-6)  # per-image z-score
        corners = [
            (r, c)
            for r in range(0, mask.shape[0] - size + 1, 32)
            for c in range(0, mask.shape[1] - size + 1, 32)
        ]
        r, c = min(
            corners,
            key=lambda rc: abs(mask[rc[0] : rc[0] + size, rc[1] : rc[1] + size].mean() - 0.5),
        )
        images.append(image[:, r : r + size, c : c + size])
        masks.append(mask[r : r + size, c : c + size].astype(np.int64))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks))


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "bf16"])
def test_tiny_unet_overfits_real_patches(amp):
    torch.manual_seed(0)
    x, y = _nist_patches(4)
    assert 0.3 < y.float().mean() < 0.7  # both classes matter
    model = UNet(1, 2, depth=3, width=8)
    loss_fn = SegmentationLoss("ce", 2)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(x)  # (N, 2, H, W), bf16 under autocast
        loss = loss_fn(logits, y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4, losses[::10]
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9


def test_segnet_training_step_runs_through_indices():
    torch.manual_seed(0)
    x, y = _nist_patches(2)
    model = SegNet(1, 2, depth=4, width=4)
    loss = SegmentationLoss("dice_ce", 2)(model(x), y)
    loss.backward()
    first, head = model.encoder[0][0][0].weight, model.head.weight
    assert torch.isfinite(loss)
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert head.grad is not None and head.grad.abs().sum() > 0

"""Pairwise fields of large slices: the sliding window, with and without usable-tissue maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scarce.align.pairs import PairField, network_field
from scarce.errors import InputError
from scarce.io import read_image
from scarce.models.field import translation, warp
from scarce.models.fieldnet import FieldNet


def _shifted_crop(shared_data, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An ISBI slice crop (z-scored, float32) and the same crop moved by (2, -3) px: the field
    aligning the moved one onto it is (-2, 3) everywhere."""
    image = read_image(shared_data / "isbi2012" / "images" / "05.png")[0, :height, :width]
    image = ((image - image.mean()) / image.std()).astype("float32")
    moved = warp(torch.from_numpy(image)[None, None], translation(2.0, -3.0, height, width))
    return moved[0, 0].numpy(), image


def test_tiled_fields_match_the_whole_slice_and_find_a_known_shift(shared_data):
    """A 256 x 320 ISBI crop moved by (2, -3) px, aligned in 128 px tiles and whole: the tiles'
    blended field equals the whole slice's to a small fraction of a pixel and both find the
    shift; also with a usable-tissue map (the 4-channel sliding-window path)."""
    source, image = _shifted_crop(shared_data, 256, 320)
    torch.manual_seed(0)
    net = FieldNet(levels=3, correlation_radius=3, smoothing=16.0, refine=False).eval()
    usable = np.ones(image.shape, bool)
    usable[100:130, 40:90] = False  # a hole of missing data in the source
    inner = (slice(None), slice(None), slice(16, -16), slice(16, -16))
    plain = network_field(net, source, image, tile_size=1024, device="cpu")
    masked = network_field(
        net, source, image, tile_size=1024, device="cpu", valid_s=~usable, valid_t=usable
    )
    assert float((masked - plain).abs().max()) > 0.5  # the maps do reach the network
    four = PairField(net, with_valid=True)
    x = torch.from_numpy(np.stack([source, image, ~usable, usable]).astype("float32"))[None]
    with torch.no_grad():
        torch.testing.assert_close(four(x), net.field(*x[:, :, None].unbind(1)))
    with pytest.raises(InputError, match="both"):
        network_field(net, source, image, tile_size=1024, device="cpu", valid_s=usable)
    for maps in ({}, {"valid_s": usable, "valid_t": np.ones_like(usable)}):
        whole = network_field(net, source, image, tile_size=1024, device="cpu", **maps)
        tiled = network_field(net, source, image, tile_size=128, device="cpu", **maps)
        assert tiled.shape == whole.shape == (1, 2, 256, 320)
        assert float((tiled - whole)[inner].abs().mean()) < 0.2
        for field in (whole, tiled):
            found = field[inner].mean(dim=(2, 3))[0]
            torch.testing.assert_close(found, torch.tensor([-2.0, 3.0]), atol=0.3, rtol=0)


def test_scattered_missing_pixels_barely_move_the_field(shared_data):
    """0.5 % of the pixels equal the missing-data value by chance (not a defect): the field
    with those pixels excluded stays within a tenth of a pixel of the field without them."""
    source, image = _shifted_crop(shared_data, 256, 256)
    torch.manual_seed(0)
    net = FieldNet(levels=4, finest_level=1, correlation_radius=3, smoothing=16.0, refine=False)
    rng = np.random.default_rng(0)
    usable_s, usable_t = (rng.random(image.shape) > 0.005 for _ in range(2))
    plain = network_field(net.eval(), source, image, tile_size=1024, device="cpu")
    masked = network_field(
        net, source, image, tile_size=1024, device="cpu", valid_s=usable_s, valid_t=usable_t
    )
    assert float((masked - plain)[..., 16:-16, 16:-16].abs().mean()) < 0.1

"""Sliding window on real images: tiled equals whole-image, tile grid, padding, errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from scarce.data.normalize import normalize
from scarce.engine import tiling
from scarce.engine.tiling import sliding_window_logits, tile_starts
from scarce.io import read_image
from scarce.models import UNet
from tests.segment.test_predict import SPEC, tiny_unet


def whole_image_logits(model, image: np.ndarray) -> torch.Tensor:
    """Reference: the whole image at once, padded at the end by reflection to size_multiple."""
    m = model.size_multiple
    _, h, w = image.shape
    padded = np.pad(image, [(0, 0), (0, -h % m), (0, -w % m)], mode="reflect")
    with torch.inference_mode():
        return model(torch.from_numpy(padded)[None])[0, :, :h, :w]


def interior(a: torch.Tensor, margin: int) -> torch.Tensor:
    """``a`` without a border of ``margin`` pixels (where padding differs)."""
    return a[..., margin:-margin, margin:-margin]


def test_tiled_equals_whole_image_bbbc039_520x696(shared_data):
    file = sorted((shared_data / "bbbc039" / "images").glob("*.png"))[0]
    image = normalize(read_image(file), SPEC)
    assert image.shape == (1, 520, 696)
    model = tiny_unet()
    whole = whole_image_logits(model, image)
    assert whole.std() > 0.1  # the logits vary across the image: equality is not vacuous
    for blend in ("gaussian", "constant"):
        # 256-px tiles at overlap 0.5: a 4 x 5 grid; overlaps >= 144 px leave the full margin
        tiled = sliding_window_logits(model, image, tile_size=256, overlap=0.5, blend=blend)
        assert tiled.shape == (2, 520, 696) and tiled.dtype == torch.float32
        torch.testing.assert_close(
            interior(tiled, model.halo + 1), interior(whole, model.halo + 1), atol=1e-4, rtol=0
        )


def test_tiled_equals_whole_image_dsb2018_1040x1388(shared_data):
    folder = shared_data / "dsb2018"
    rows = [r.split(",") for r in (folder / "metadata.csv").read_text().splitlines()[1:]]
    ident = next(r[0] for r in rows if (r[2], r[3]) == ("1040", "1388"))
    image = normalize(read_image(folder / "images" / f"{ident}.png"), SPEC)
    model = tiny_unet(in_channels=image.shape[0])
    whole = whole_image_logits(model, image)  # 1388 is not a multiple of 8: padded to 1392
    assert whole.std() > 0.1
    for blend in ("gaussian", "constant"):
        # 384-px tiles at overlap 0.34: a 4 x 5 grid, overlaps of 128-168 px >= 2 * 56 px
        tiled = sliding_window_logits(
            model, image, tile_size=384, overlap=0.34, blend=blend, batch_size=3
        )
        assert tiled.shape == (2, 1040, 1388)
        torch.testing.assert_close(
            interior(tiled, model.halo + 1), interior(whole, model.halo + 1), atol=1e-4, rtol=0
        )
    # a context margin below the halo makes seams visible: the check above can fail
    low = sliding_window_logits(model, image, tile_size=384, overlap=0.1, blend="constant")
    assert (interior(low, model.halo + 1) - interior(whole, model.halo + 1)).abs().max() > 1e-3


def test_single_tile_gives_exactly_the_whole_image_result(shared_data):
    image = normalize(read_image(shared_data / "nist_rpe" / "images" / "img_056231.tif"), SPEC)
    model = tiny_unet()
    tiled = sliding_window_logits(model, image, tile_size=250, overlap=0.5)  # rounded to 256
    assert torch.equal(tiled, whole_image_logits(model, image))


def test_tiny_and_odd_images_are_padded_and_cropped(shared_data):
    image = normalize(read_image(shared_data / "isbi2012" / "images" / "00.png"), SPEC)
    model = tiny_unet()
    small = np.ascontiguousarray(image[:, :20, :20])
    logits = sliding_window_logits(model, small, tile_size=256)
    assert logits.shape == (2, 20, 20) and torch.isfinite(logits).all()
    padded = np.pad(small, [(0, 0), (0, 236), (0, 236)], mode="reflect")
    with torch.inference_mode():
        expected = model(torch.from_numpy(padded)[None])[0, :, :20, :20]
    assert torch.equal(logits, expected)
    for shape in [(1, 1), (1, 7), (33, 5)]:
        crop = np.ascontiguousarray(image[:, : shape[0], : shape[1]])
        assert sliding_window_logits(model, crop, tile_size=16).shape == (2, *shape)


def test_tile_grid_starts_on_the_pooling_grid_and_covers_the_axis():
    for size, tile, overlap in [
        (696, 256, 0.5),
        (1392, 384, 0.25),
        (256, 256, 0.5),
        (4096, 512, 0.5),
        (520, 256, 0.0),
    ]:
        starts = tile_starts(size, tile, overlap, multiple=16 if size % 16 == 0 else 8)
        assert starts[0] == 0 and starts[-1] == size - tile
        assert all(s % 8 == 0 for s in starts)
        steps = np.diff(starts)
        assert (steps > 0).all() and (steps <= tile * (1 - overlap) + 16).all()
    assert tile_starts(512, 256, 0.5, 16) == [0, 128, 256]


def test_low_overlap_warns_once_and_bad_arguments_say_what_is_wrong(caplog):
    torch.manual_seed(0)
    model = UNet(1, 2, depth=2, width=4).eval()  # halo > 8 px, size_multiple 4
    image = torch.randn(1, 40, 52)
    tiling._warned.clear()
    with caplog.at_level(logging.WARNING, logger="scarce.engine.tiling"):
        for _ in range(2):
            sliding_window_logits(model, image, tile_size=16, overlap=0.25)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "context margin" in warnings[0]
    bad = [
        (dict(image=image.to(torch.int32)), TypeError, "normalised float"),
        (dict(image=image[0]), ValueError, r"\(C, H, W\)"),
        (dict(image=image.repeat(3, 1, 1)), ValueError, "3 channel"),
        (dict(overlap=1.0), ValueError, r"overlap must be in \[0, 1\)"),
        (dict(blend="cosine"), ValueError, "blend must be one of"),
        (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    ]
    for change, error, message in bad:
        kwargs = {"image": image, "tile_size": 16, **change}
        with pytest.raises(error, match=message):
            sliding_window_logits(model, **kwargs)


def test_the_accumulator_moves_to_the_cpu_when_the_gpu_is_small(monkeypatch):
    from scarce.engine.tiling import accumulator_device

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * gib, 80 * gib))
    cuda = torch.device("cuda:0")
    assert accumulator_device(cuda, 4 * gib, "auto") == cuda
    assert accumulator_device(cuda, 12 * gib, "auto") == torch.device("cpu")  # > half of free
    assert accumulator_device(cuda, 12 * gib, "device") == cuda
    assert accumulator_device(cuda, 1, "cpu") == torch.device("cpu")
    assert accumulator_device(torch.device("cpu"), 12 * gib, "device") == torch.device("cpu")

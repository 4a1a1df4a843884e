"""Tests of scarce.data.drift: training statistics and the predict-time check, on real images."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from scarce.data.drift import (
    STATISTICS,
    image_statistics,
    training_statistics,
    unusual_statistics,
    warn_if_unusual,
)
from scarce.data.normalize import normalization_spec, normalize
from scarce.io import list_image_files, read_image, read_mask
from tests.shared import SHARED_DATA


def bbbc039(with_nuclei: bool, count: int) -> list[np.ndarray]:
    """The first ``count`` bbbc039 images with >= 50 nuclei (or with none)."""
    folder = SHARED_DATA / "bbbc039"
    if not folder.is_dir():
        pytest.skip(f"bbbc039 not found at {folder}")
    out = []
    for f in list_image_files(folder / "images"):
        nuclei = len(np.unique(read_mask(folder / "masks" / f.name))) - 1
        if nuclei >= 50 if with_nuclei else nuclei == 0:
            out.append(read_image(f))
        if len(out) == count:
            return out
    raise AssertionError("not enough bbbc039 images of that kind")


@pytest.fixture(scope="module")
def fluorescence():
    """``(spec, training statistics, held-out nuclei field, empty field)`` from bbbc039."""
    fields = bbbc039(True, 13)
    train, held_out = fields[:12], fields[12]
    spec = normalization_spec("robust", images=train)
    stats = training_statistics(normalize(im, spec) for im in train)
    return spec, stats, held_out, bbbc039(False, 1)[0]


def test_statistics_are_plain_json_per_channel():
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (2, 64, 64)).astype(np.float32)
    got = image_statistics(image)
    assert set(got) == set(STATISTICS) and all(len(v) == 2 for v in got.values())
    assert got["noise"][0] == pytest.approx(1.0, rel=0.1)
    summary = training_statistics([image, image * 2])
    assert json.loads(json.dumps(summary)) == summary and summary["images"] == 2
    with pytest.raises(ValueError, match="no training images"):
        training_statistics([])


def test_a_field_like_the_training_fields_passes(fluorescence):
    spec, stats, held_out, _ = fluorescence
    assert unusual_statistics(normalize(held_out, spec), stats) == []


def test_an_empty_field_and_another_modality_are_named(fluorescence):
    spec, stats, _, empty = fluorescence
    problems = unusual_statistics(normalize(empty, spec), stats)
    assert any(p.startswith("p99.8") for p in problems)  # the floor held: range below 1
    assert any(p.startswith("noise") for p in problems)
    phase = read_image(list_image_files(SHARED_DATA / "nist_rpe" / "images")[0])
    assert unusual_statistics(normalize(phase, spec), stats)  # phase contrast, not nuclei


def test_dataset_normalisation_flags_an_8_bit_image(fluorescence):
    _, _, held_out, _ = fluorescence
    train = bbbc039(True, 12)
    meta = {"intensity": {"mean": [float(np.mean(train))], "std": [float(np.std(train))]}}
    spec = normalization_spec("dataset", metadata=meta)
    stats = training_statistics(normalize(im, spec) for im in train)
    x = held_out.astype(np.float64)
    eight = np.round(255 * (x - x.min()) / (x.max() - x.min())).astype(np.uint8)
    assert unusual_statistics(normalize(held_out, spec), stats) == []
    problems = unusual_statistics(normalize(eight, spec), stats)
    assert any(p.startswith("median") for p in problems)


def test_warning_is_logged_once_and_names_the_image(fluorescence, caplog):
    spec, stats, held_out, empty = fluorescence
    with caplog.at_level(logging.WARNING, logger="scarce.data.drift"):
        assert warn_if_unusual(normalize(held_out, spec), stats, "near.png") == []
        problems = warn_if_unusual(normalize(empty, spec), stats, "empty.png")
        assert warn_if_unusual(normalize(empty, spec), None, "old-checkpoint.png") == []
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert message.startswith("empty.png:") and problems[0] in message

"""A trained nuclei model on other acquisitions: gain, offset, bit depth, empty fields, drift.

``fixtures/nuclei_tiny.pt`` is a small U-Net trained on bbbc039's training split with
``robust`` normalisation (``fixtures/make_nuclei_tiny.py`` remakes it); every image here is
from the test split (every 5th by sorted name), which it never saw.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from scarce.demo import every_nth_split
from scarce.engine.checkpoint import load_model
from scarce.io import list_image_files, read_image, read_mask
from scarce.segment.predict import instance_options, instances_from_prediction, predict_image
from tests.shared import SHARED_DATA

FIXTURE = Path(__file__).parent / "fixtures" / "nuclei_tiny.pt"
BBBC = SHARED_DATA / "bbbc039"


@pytest.fixture(scope="module")
def nuclei_model():
    if not BBBC.is_dir():
        pytest.skip(f"bbbc039 not found at {BBBC}")
    return load_model(FIXTURE)


def test_fields(empty: bool) -> list[tuple[str, np.ndarray]]:
    """``(name, image)`` of the bbbc039 test fields without nuclei (or with >= 50)."""
    test = set(every_nth_split(BBBC / "images")["test"])
    out = []
    for f in list_image_files(BBBC / "images"):
        if f.stem in test:
            nuclei = len(np.unique(read_mask(BBBC / "masks" / f.name))) - 1
            if nuclei == 0 if empty else nuclei >= 50:
                out.append((f.name, read_image(f)))
    return out


test_fields.__test__ = False  # a helper, not a test


def class_map(model, ckpt, image) -> np.ndarray:
    return predict_image(model, image, ckpt, device="cpu").argmax(0).numpy()


def reencoded(image: np.ndarray) -> dict[str, np.ndarray]:
    """The same scene as other cameras and settings record it."""
    x = image.astype(np.float64)
    lo, hi = x.min(), x.max()
    return {
        "gain x4": (image * 4).astype(np.uint16),
        "gain x0.25": np.round(x * 0.25).astype(np.uint16),
        "offset +500": (image + 500).astype(np.uint16),
        "offset -500 (float)": (x - 500).astype(np.float32),
        "float32 / 4095": (x / 4095).astype(np.float32),
        "8-bit": np.round(255 * (x - lo) / (hi - lo)).astype(np.uint8),
    }


def test_class_map_is_invariant_to_gain_offset_and_bit_depth(nuclei_model):
    model, ckpt = nuclei_model
    name, image = test_fields(empty=False)[0]
    reference = class_map(model, ckpt, image)
    assert 0.05 < np.mean(reference > 0) < 0.6, name  # the model finds nuclei at all
    for label, other in reencoded(image).items():
        changed = np.mean(class_map(model, ckpt, other) != reference)
        # exact affine changes move only float rounding; 8-bit and x0.25 re-quantise the
        # image (one 8-bit level is 0.4 % of this field's range)
        limit = 2e-3 if label in ("8-bit", "gain x0.25") else 1e-4
        assert changed <= limit, f"{label}: {changed:.2%} of pixels changed class"


def test_an_empty_field_stays_empty(nuclei_model):
    model, ckpt = nuclei_model
    fields = test_fields(empty=True)
    assert len(fields) == 2  # bbbc039's two empty fields are both in the test split
    options = instance_options(ckpt)  # the model's min_object_size (and score, 0 here)
    for name, image in fields:
        for label, other in {"as recorded": image, **reencoded(image)}.items():
            probs = predict_image(model, other, ckpt, device="cpu")
            objects = instances_from_prediction(probs, "boundary", **options)
            assert objects.max() == 0, f"{name} {label}: {objects.max()} false nuclei"
    # the noise floor is what keeps it empty: plain per-image percentiles stretch the noise
    plain = {**ckpt, "extras": {**ckpt["extras"]}}
    plain["extras"]["normalization"] = {**ckpt["extras"]["normalization"], "mode": "percentile"}
    painted = [np.mean(class_map(model, plain, image) > 0) for _, image in fields]
    assert max(painted) > 0.05


def test_out_of_distribution_warning_names_the_image_and_statistic(nuclei_model, caplog):
    model, ckpt = nuclei_model
    name, image = test_fields(empty=False)[0]
    phase = read_image(list_image_files(SHARED_DATA / "nist_rpe" / "images")[0])
    with caplog.at_level(logging.WARNING, logger="scarce.data.drift"):
        predict_image(model, image, ckpt, device="cpu", name=name)
        assert caplog.records == []  # a test field of the training kind passes
        predict_image(model, phase, ckpt, device="cpu", name="phase.png")
    (record,) = caplog.records  # one warning for the image
    message = record.getMessage()
    assert message.startswith("phase.png:") and "training" in message
    assert any(stat in message for stat in ("median", "p99.8", "noise", "p1 "))

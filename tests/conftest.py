"""Shared fixtures: paths to ../shared/data and small real databases made with `scarce ingest`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.shared import SHARED_DATA

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (skips the test when it is absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA


def _subset(src: Path, dst: Path, n: int) -> Path:
    """Symlink the first ``n`` image/mask pairs of a dataset into ``dst``."""
    for sub in ("images", "masks"):
        (dst / sub).mkdir(parents=True)
        for f in sorted((src / sub).iterdir())[:n]:
            (dst / sub / f.name).symlink_to(f)
    return dst


def _small_db(shared_data, tmp_path_factory, dataset: str, n: int, **ingest_options) -> Path:
    """DB_DIR of the first ``n`` images of ``dataset``, every 5th image by name as test."""
    from scarce.data.ingest import ingest
    from scarce.demo import every_nth_split

    root = tmp_path_factory.mktemp(dataset)
    data = _subset(shared_data / dataset, root / "data", n)
    ingest(
        data / "images",
        data / "masks",
        root / "db",
        split=every_nth_split(data / "images"),
        progress=False,
        **ingest_options,
    )
    return root / "db"


@pytest.fixture(scope="session")
def nist_db(shared_data, tmp_path_factory) -> Path:
    """DB_DIR with 10 nist_rpe images (256x256 uint16, classes 0/1): 8 train, 2 test."""
    return _small_db(shared_data, tmp_path_factory, "nist_rpe", 10)


@pytest.fixture(scope="session")
def nist_run(nist_db, tmp_path_factory) -> Path:
    """A run folder of a tiny U-Net trained for 12 steps on ``nist_db`` (dataset normalisation).

    The checkpoint records its training data (``extras["dataset"]``: test images, pixel size).
    """
    from scarce.config import TrainConfig, override
    from scarce.segment.task import train

    cfg = override(
        TrainConfig(),
        {
            "max_steps": 12,
            "test_every_n_steps": 12,
            "amp": "off",
            "data.patch_size": 64,
            "data.batch_size": 2,
            "data.reader_count": 0,
            "data.normalization": "dataset",
            "model.width": 4,
            "model.depth": 3,
        },
    )
    run = tmp_path_factory.mktemp("nist_run") / "run"
    train(nist_db / "train.lmdb", nist_db / "test.lmdb", run, cfg)
    return run


@pytest.fixture(scope="session")
def nist_package(nist_run, tmp_path_factory) -> Path:
    """``nist_run`` exported with ``scarce export --format bioimageio`` (authors etc. by flag)."""
    pytest.importorskip("bioimageio.core")
    pytest.importorskip("onnxruntime")
    from scarce.cli import main

    out = tmp_path_factory.mktemp("bioimageio") / "nist.zip"
    flags = ["--author", "Ada Lovelace", "--license", "MIT", "--cite", "NIST RPE data"]
    flags += ["--doi", "10.18434/M32138"]
    args = ["export", "--model", str(nist_run), "--format", "bioimageio", "--out", str(out)]
    assert main([*args, *flags]) == 0
    return out

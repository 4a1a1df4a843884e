"""bioimage.io export: a nist_rpe model's package passes bioimageio.core's test and its test
tensors reproduce `scarce predict`."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import tifffile
import yaml

from scarce.cli import main
from scarce.data.store import read_metadata

pytest.importorskip("bioimageio.core")
pytest.importorskip("onnxruntime")
from scarce.segment.bioimageio import preprocessing  # noqa: E402


@pytest.fixture(scope="module")
def package(nist_package):
    return nist_package


def test_package_passes_bioimageio_core_test(package):
    from bioimageio.core import test_model

    summary = test_model(str(package))
    assert summary.status == "passed", summary.format()
    tested = {d.name for d in summary.details if d.status == "passed"}
    assert any("onnx" in n for n in tested) and any("torchscript" in n for n in tested)


def test_package_describes_the_model_and_its_data(package, nist_run, nist_db):
    with zipfile.ZipFile(package) as z:
        rdf = yaml.safe_load(z.read("rdf.yaml"))
        names = set(z.namelist())
    assert {"weights.pt", "weights.onnx", "cover.png", "README.md"} <= names
    assert rdf["authors"] == [{"name": "Ada Lovelace"}] and rdf["license"] == "MIT"
    assert {"text": "NIST RPE data", "doi": "10.18434/M32138", "url": None} in rdf["cite"]
    raw, probs = rdf["inputs"][0], rdf["outputs"][0]
    stats = read_metadata(nist_db / "train.lmdb")["intensity"]
    pre = next(p for p in raw["preprocessing"] if p["id"] == "fixed_zero_mean_unit_variance")
    assert pre["kwargs"]["mean"] == pytest.approx(stats["mean"][0])
    assert pre["kwargs"]["std"] == pytest.approx(stats["std"][0])
    assert probs["postprocessing"][0] == {"id": "softmax", "kwargs": {"axis": "channel"}}
    y_in, y_out = raw["axes"][2], probs["axes"][2]
    assert y_in["size"]["step"] == 8 and y_in["size"]["min"] % 8 == 0  # depth-3 U-Net
    assert y_out["halo"] > 0 and y_in["size"]["min"] >= 2 * y_out["halo"]
    with zipfile.ZipFile(package) as z:
        readme = z.read("README.md").decode()
    assert (
        "## Validation" in readme
        and "## Training data" in readme
        and "mean_dice" in readme
        and "deepImageJ" in readme
    )


def test_test_tensors_reproduce_scarce_predict(package, nist_run, tmp_path):
    with zipfile.ZipFile(package) as z:
        z.extract("test_input.npy", tmp_path)
        z.extract("test_output.npy", tmp_path)
    x = np.load(tmp_path / "test_input.npy")[0]
    expected = np.load(tmp_path / "test_output.npy")[0]
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "crop.tif", x[0].astype(np.uint16))
    side = str(x.shape[-1])
    assert (
        main(
            [
                "predict",
                "--model",
                str(nist_run),
                "--images",
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "out"),
                "--probabilities",
                "--tile-size",
                side,
            ]
        )
        == 0
    )
    got = tifffile.imread(tmp_path / "out" / "crop_prob.tif")
    assert np.abs(got - expected).max() < 1e-5


def test_normalisations_map_to_bioimageio_preprocessing():
    zscore = preprocessing(
        {"mode": "zscore", "percentiles": [1, 99.8], "mean": None, "std": None}, 1
    )
    assert zscore[1].id == "zero_mean_unit_variance" and list(zscore[1].kwargs.axes) == ["y", "x"]
    pct = preprocessing(
        {"mode": "percentile", "percentiles": [2, 99], "mean": None, "std": None}, 3
    )
    assert pct[1].id == "scale_range"
    assert (pct[1].kwargs.min_percentile, pct[1].kwargs.max_percentile) == (2, 99)
    data = preprocessing(
        {"mode": "dataset", "percentiles": [1, 99.8], "mean": [1, 2], "std": [3, 4]}, 2
    )
    assert data[1].kwargs.mean == [1, 2] and data[1].kwargs.axis == "channel"
    assert all(step.id == "ensure_dtype" for step in (zscore[0], pct[0], data[0]))


def test_an_unknown_licence_is_refused_in_one_line(nist_run, tmp_path, capsys):
    args = ["export", "--model", str(nist_run), "--format", "bioimageio", "--out"]
    assert main([*args, str(tmp_path / "m.zip"), "--license", "my-own"]) == 2
    assert "licence 'my-own' is not an SPDX identifier" in capsys.readouterr().err
    assert not (tmp_path / "m.zip").exists()

"""`scarce predict` on OME-Zarr images (block-wise) and on a local Dask cluster."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from scarce.cli import main
from scarce.io import list_image_files, read_image

pytest.importorskip("ome_zarr")
pytest.importorskip("dask_image")
zarr = pytest.importorskip("zarr")
from scarce.data import omezarr  # noqa: E402
from tests.data.test_omezarr import validate  # noqa: E402


@pytest.fixture(scope="module")
def mosaic(shared_data, tmp_path_factory):
    """nist_rpe images 10-15 as a 512 x 768 mosaic: an OME-Zarr (0.65 um/px) and a TIFF."""
    files = list_image_files(shared_data / "nist_rpe" / "images")[10:16]
    tiles = [read_image(f)[0] for f in files]
    image = np.block([tiles[:3], tiles[3:]])[None]
    root = tmp_path_factory.mktemp("mosaic")
    with omezarr.staged(root / "mosaic.ome.zarr") as group:
        omezarr.write_image(group, image, pixel_size_um=0.65, chunks=200)
    (root / "tif").mkdir()
    tifffile.imwrite(root / "tif" / "mosaic.tif", image[0])
    return root


def test_zarr_prediction_equals_tiff_prediction_and_validates(nist_run, mosaic, tmp_path):
    flags = ["--model", str(nist_run), "--tile-size", "128", "--instances", "--probabilities"]
    assert (
        main(["predict", *flags, "--images", str(mosaic / "tif"), "--out", str(tmp_path / "t")])
        == 0
    )
    assert (
        main(
            [
                "predict",
                *flags,
                "--images",
                str(mosaic / "mosaic.ome.zarr"),
                "--out",
                str(tmp_path / "z"),
                "--chunk-size",
                "256",
            ]
        )
        == 0
    )
    out = tmp_path / "z" / "mosaic.ome.zarr"
    validate(out)
    group = zarr.open_group(str(out), mode="r")
    probs, classes = group["s0"][:], group["labels/class_map/s0"][:]
    instances = group["labels/instances/s0"][:]
    expected = tifffile.imread(tmp_path / "t" / "mosaic_prob.tif")
    assert probs.shape == expected.shape == (2, 512, 768)
    assert np.abs(probs - expected).max() < 1e-5
    assert np.array_equal(classes, tifffile.imread(tmp_path / "t" / "mosaic.tif"))
    from tests.segment.test_blockwise import same_objects

    assert same_objects(instances, tifffile.imread(tmp_path / "t" / "mosaic_instances.tif"))
    scale = group["labels/class_map"].attrs["multiscales"][0]["datasets"][0]
    assert scale["coordinateTransformations"][0]["scale"] == [0.65, 0.65]


def test_two_worker_local_cluster_gives_the_same_outputs(nist_run, mosaic, tmp_path):
    flags = ["--model", str(nist_run), "--tile-size", "128", "--workers", "2"]
    assert (
        main(
            [
                "predict",
                *flags,
                "--images",
                str(mosaic / "mosaic.ome.zarr"),
                "--out",
                str(tmp_path / "z"),
                "--chunk-size",
                "256",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                *flags,
                "--images",
                str(mosaic / "tif"),
                "--out",
                str(tmp_path / "t"),
                "--pixel-size-um",
                "0.5",
            ]
        )
        == 0
    )
    classes = zarr.open_group(str(tmp_path / "z" / "mosaic.ome.zarr"))["labels/class_map/s0"][:]
    with tifffile.TiffFile(tmp_path / "t" / "mosaic.tif") as tif:
        assert np.array_equal(classes, tif.asarray())
        x_res = tif.pages[0].tags["XResolution"].value
        assert x_res[1] / x_res[0] == pytest.approx(0.5)


def test_block_wise_refuses_tta_and_overwriting_its_input(nist_run, mosaic, capsys):
    flags = ["--model", str(nist_run), "--images", str(mosaic / "mosaic.ome.zarr")]
    assert main(["predict", *flags, "--out", str(mosaic), "--tta"]) == 2
    assert "--tta is not available for block-wise" in capsys.readouterr().err
    assert main(["predict", *flags, "--out", str(mosaic)]) == 2
    assert "would replace the input image" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                *flags,
                "--out",
                str(mosaic),
                "--workers",
                "2",
                "--dask-scheduler",
                "tcp://127.0.0.1:1",
            ]
        )
        == 2
    )
    assert "either --dask-scheduler or --workers" in capsys.readouterr().err


def test_the_network_runs_once_per_block(nist_run, mosaic, tmp_path, monkeypatch):
    """Writing the class map and its label image (and instances) must not re-run the network."""
    from scarce.segment import blockwise

    calls = []
    original = blockwise._block_probabilities

    def counted(*args, block_info=None, **kwargs):
        calls.append(block_info[0]["chunk-location"])
        return original(*args, block_info=block_info, **kwargs)

    monkeypatch.setattr(blockwise, "_block_probabilities", counted)
    from scarce.segment.scaleout import predict_zarr

    with blockwise.dask_client():
        predict_zarr(
            nist_run, mosaic / "mosaic.ome.zarr", tmp_path, chunk=256, tile_size=128, instances=True
        )
    assert sorted(calls) == [(0, i, j) for i in range(2) for j in range(3)]  # 512 x 768 image


def test_block_wise_object_scores_match_whole_image_ones(shared_data, tmp_path):
    """``predict.min_object_score`` drops the same nuclei from OME-Zarr as from a TIFF."""
    from scarce.engine.checkpoint import load_checkpoint, save_checkpoint
    from tests.segment.test_blockwise import same_objects
    from tests.segment.test_robustness import FIXTURE, test_fields  # a small nuclei model

    _, image = test_fields(empty=False)[0]  # a bbbc039 test field, 520 x 696
    (tmp_path / "tif").mkdir()
    tifffile.imwrite(tmp_path / "tif" / "field.tif", image[0])
    with omezarr.staged(tmp_path / "field.ome.zarr") as group:
        omezarr.write_image(group, image, chunks=256)

    def predict(model, images, out, *flags):
        args = ["--model", str(model), "--instances", *flags]
        assert main(["predict", *args, "--images", str(images), "--out", str(out)]) == 0

    predict(FIXTURE, tmp_path / "tif", tmp_path / "all", "--probabilities")
    every = tifffile.imread(tmp_path / "all" / "field_instances.tif").astype(np.int64)
    foreground = 1.0 - tifffile.imread(tmp_path / "all" / "field_prob.tif")[0]
    scores = np.bincount(every.ravel(), foreground.ravel()) / np.bincount(every.ravel())
    ckpt = load_checkpoint(FIXTURE)
    ckpt["config"]["predict"]["min_object_score"] = float(np.median(scores[1:]))
    model = save_checkpoint(tmp_path / "scored.pt", ckpt)
    predict(model, tmp_path / "tif", tmp_path / "tif_out")
    kept = tifffile.imread(tmp_path / "tif_out" / "field_instances.tif")
    assert 10 < kept.max() < every.max()  # about half the nuclei go
    # block-wise, without --probabilities: the object scores read them back all the same
    predict(model, tmp_path / "field.ome.zarr", tmp_path / "zarr", "--chunk-size", "256")
    group = zarr.open_group(str(tmp_path / "zarr" / "field.ome.zarr"), mode="r")
    assert group["s0"].shape[0] == 3 and group["s0"].dtype == np.float32
    assert same_objects(group["labels/instances/s0"][:], kept)

"""The napari plugin: its reader and model runner without a GUI, its widget in a headless viewer."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from scarce.cli import main
from scarce.engine.checkpoint import load_model
from scarce.io import read_image
from scarce.segment.predict import predict_image

pytest.importorskip("napari")
pytest.importorskip("ome_zarr")
from scarce.napari.reader import get_reader  # noqa: E402
from scarce.napari.run import predict_layers  # noqa: E402

IMAGE = "img_004422.tif"


@pytest.fixture(scope="module")
def outputs(nist_run, shared_data, tmp_path_factory):
    """`scarce predict` outputs of one nist_rpe image: TIFFs and an OME-Zarr group."""
    from scarce.data import omezarr

    root = tmp_path_factory.mktemp("napari")
    (root / "in").mkdir()
    shutil.copy(shared_data / "nist_rpe" / "images" / IMAGE, root / "in" / IMAGE)
    with omezarr.staged(root / "in" / "img.ome.zarr") as group:
        omezarr.write_image(group, read_image(root / "in" / IMAGE), pixel_size_um=0.65)
    flags = ["--model", str(nist_run), "--instances", "--probabilities", "--pixel-size-um", "0.65"]
    assert main(["predict", *flags, "--images", str(root / "in"), "--out", str(root / "out")]) == 0
    return root / "out"


def test_reader_opens_scarce_outputs_with_their_pixel_size(outputs):
    layers = get_reader(outputs / "img.ome.zarr")(outputs / "img.ome.zarr")
    kinds = {kwargs["name"]: kind for _, kwargs, kind in layers}
    assert kinds == {"img.ome.zarr": "image", "class_map": "labels", "instances": "labels"}
    assert all(kwargs["scale"] == (0.65, 0.65) for _, kwargs, _ in layers)
    stem = IMAGE[:-4]
    data, kwargs, kind = get_reader(outputs / f"{stem}_instances.tif")(
        outputs / f"{stem}_instances.tif"
    )[0]
    assert kind == "labels" and kwargs["scale"] == pytest.approx((0.65, 0.65)) and data.max() > 0
    data, kwargs, kind = get_reader(outputs / f"{stem}_prob.tif")(outputs / f"{stem}_prob.tif")[0]
    assert kind == "image" and data.shape == (2, 256, 256) and kwargs["channel_axis"] == 0
    assert get_reader(outputs / f"{stem}.tif") is None  # a class map TIFF: napari's own reader
    assert get_reader(outputs / "nothing.zarr") is None


def test_runner_gives_scarce_predictions_for_checkpoints_and_packages(
    nist_run, nist_package, shared_data
):
    image = read_image(shared_data / "nist_rpe" / "images" / IMAGE)
    model, ckpt = load_model(nist_run)
    expected = predict_image(model, image, ckpt).numpy()
    layers = predict_layers(nist_run, image[0], instances=True)
    assert [kind for *_, kind in layers] == ["labels", "labels", "image"]
    assert np.array_equal(layers[0][0], expected.argmax(0))
    assert np.abs(layers[2][0] - expected).max() < 1e-5
    packaged = predict_layers(nist_package, image[0], instances=False)
    agree = (packaged[0][0] == expected.argmax(0)).mean()  # bioimageio.core tiles differently
    assert agree > 0.99


needs_display = pytest.mark.skipif(
    not os.environ.get("DISPLAY"),
    reason="no X display: install Xvfb (scripts/install_gui_libs.sh) so pytest-xvfb starts one",
)


@pytest.mark.gui
@needs_display
def test_widget_segments_the_current_layer_in_the_background(
    make_napari_viewer, qtbot, nist_run, shared_data
):
    from scarce.napari.widget import ScarceWidget

    viewer = make_napari_viewer()
    image = read_image(shared_data / "nist_rpe" / "images" / IMAGE)[0]
    viewer.add_image(image, name="phase", scale=(0.65, 0.65))
    widget = ScarceWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.image.value == "phase"
    widget.model.value = str(nist_run)
    worker = widget.run()
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    qtbot.waitUntil(lambda: "run classes" in viewer.layers, timeout=10_000)
    classes = viewer.layers["run classes"]
    model, ckpt = load_model(nist_run)
    expected = predict_image(model, image[None], ckpt).numpy().argmax(0)
    assert np.array_equal(np.asarray(classes.data), expected)
    assert tuple(classes.scale) == (0.65, 0.65)
    assert "run instances" in viewer.layers and widget.status.value == "added 3 layer(s)"

"""Export to TorchScript and ONNX: same logits as PyTorch on a real image at two sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scarce.data.normalize import normalize
from scarce.engine.checkpoint import load_model
from scarce.engine.export import read_export_metadata
from scarce.io import read_image
from scarce.segment.export import export_model
from scarce.segment.task import target_of
from tests.segment.test_predict import SPEC, tiny_unet, write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("export") / "m.pt", tiny_unet(seed=3))


def real_inputs(shared_data) -> list[torch.Tensor]:
    """A normalised isbi2012 section at 512x512 and a 200x328 crop (batch of 1 each)."""
    image = normalize(read_image(shared_data / "isbi2012" / "images" / "07.png"), SPEC)
    return [
        torch.from_numpy(image)[None],
        torch.from_numpy(np.ascontiguousarray(image[:, 100:300, 50:378]))[None],
    ]


def check_metadata(meta: dict, ckpt: dict) -> None:
    assert meta["normalization"] == SPEC
    assert meta["class_names"] == list(target_of(ckpt).class_names)
    assert (meta["in_channels"], meta["num_classes"], meta["size_multiple"]) == (1, 2, 8)
    assert meta["target"] == "semantic" and "multiples of size_multiple" in meta["input"]


@pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning")
def test_torchscript_export_matches_pytorch(checkpoint, tmp_path, shared_data):
    model, ckpt = load_model(checkpoint)
    out = export_model(checkpoint, "torchscript", tmp_path / "sub" / "model.pt")
    scripted = torch.jit.load(str(out))
    for x in real_inputs(shared_data):
        with torch.inference_mode():
            expected, got = model(x), scripted(x)
        assert got.shape == (1, 2, *x.shape[2:])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    check_metadata(json.loads((tmp_path / "sub" / "model.pt.json").read_text()), ckpt)
    check_metadata(read_export_metadata(out), ckpt)


def test_onnx_export_matches_pytorch(checkpoint, tmp_path, shared_data):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, ckpt = load_model(checkpoint)
    out = export_model(checkpoint, "onnx", tmp_path / "model.onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    for x in real_inputs(shared_data):
        with torch.inference_mode():
            expected = model(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    check_metadata(json.loads((tmp_path / "model.onnx.json").read_text()), ckpt)
    check_metadata(read_export_metadata(out), ckpt)


def test_export_refuses_unknown_format(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="torchscript"):
        export_model(checkpoint, "tflite", tmp_path / "m.tflite")
    assert not list(tmp_path.iterdir())

"""Export a segmentation checkpoint as a bioimage.io model package (spec 0.5).

The package (a zip) runs in the tools biologists use: deepImageJ (Fiji), QuPath's
bioimage.io extension, ilastik >= 1.4, napari, BiaPy, ZeroCostDL4Mic. It is described with the
``bioimageio.spec`` package (not hand-written YAML) and holds:

- TorchScript **and** ONNX weights (:func:`scarce.engine.export.export_network`, each
  checked against PyTorch), ONNX declared as converted from TorchScript;
- the input ``raw`` ``(batch, channel, y, x)``: sizes ``min + n * size_multiple``, pixel
  size in micrometres, and the checkpoint's normalisation as preprocessing (dataset
  statistics -> ``fixed_zero_mean_unit_variance`` per channel; per-image z-score ->
  ``zero_mean_unit_variance``; percentiles -> ``scale_range``);
- the output ``probabilities`` ``(batch, channel, y, x)``: class names, the halo (pixels to
  crop at tile borders), ``softmax`` postprocessing;
- test tensors from a real test image (a square crop whose side is a multiple of the size
  multiple, so ``scarce predict --tile-size SIDE`` on the crop gives the same output), a cover
  image, and a README with the training data, metrics and how the model was trained;
- authors, licence and citations from flags, else the training data's ``dataset.yaml``, else
  defaults (the user's login name, CC-BY-4.0, the U-Net paper).

The package is tested with ``bioimageio.core.test_model`` before it is reported done.

Needs the optional extras ``pip install 'scarce[bioimageio,onnx]'``.

References
----------
bioimage.io model specification 0.5, https://bioimage.io/docs (``bioimageio.spec``);
Ouyang W. et al. "BioImage Model Zoo: a community-driven resource for accessible deep learning
in bioimage analysis." bioRxiv (2022). doi:10.1101/2022.06.07.495102
"""

from __future__ import annotations

import getpass
import logging
import re
import tempfile
from pathlib import Path

import numpy as np
import tifffile
import torch

from scarce import atomic
from scarce.engine.checkpoint import load_model
from scarce.engine.export import export_network
from scarce.errors import InputError, MissingInputError
from scarce.io import read_image
from scarce.segment import bioimageio_docs as docs
from scarce.segment.blockwise import context_depth
from scarce.segment.export import export_metadata
from scarce.segment.predict import pixel_size_of, predict_image
from scarce.segment.task import target_of

logger = logging.getLogger(__name__)

DEFAULT_LICENSE = "CC-BY-4.0"  # bioimage.io's recommendation for model weights
UNET_CITATION = {
    "text": "Ronneberger O., Fischer P., Brox T. U-Net: Convolutional Networks for Biomedical "
    "Image Segmentation. MICCAI 2015.",
    "doi": "10.1007/978-3-319-24574-4_28",
}
TEST_SIDE = 512  # largest side of the test tensors, pixels


def _spec():
    try:
        from bioimageio.spec.model import v0_5
    except ImportError as exc:
        raise InputError(
            f"bioimage.io export needs the optional package bioimageio.spec ({exc}); install "
            "it with: pip install 'scarce[bioimageio,onnx]'"
        ) from exc
    return v0_5


def identifier(text: str, fallback: str) -> str:
    """A bioimage.io identifier (letters, digits, ``_``, ``-``) made from a name."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", str(text)).strip("_")
    return cleaned or fallback


def preprocessing(spec: dict, channels: int) -> list:
    """bioimage.io preprocessing steps equal to Scarce's normalisation ``spec``.

    Parameters
    ----------
    spec : dict
        :func:`scarce.data.normalize.normalization_spec` of the checkpoint.
    channels : int

    Returns
    -------
    list
        ``ensure_dtype(float32)``, then one of ``fixed_zero_mean_unit_variance`` (dataset
        mean/std per channel), ``zero_mean_unit_variance`` (per image and channel over y, x),
        ``scale_range`` (per image and channel, percentiles ``[lo, hi]``; also for
        ``robust``, whose noise floor has no bioimage.io operator: logged).
    """
    v = _spec()
    steps = [v.EnsureDtypeDescr(kwargs=v.EnsureDtypeKwargs(dtype="float32"))]
    space = [v.AxisId("y"), v.AxisId("x")]
    if spec["mode"] == "dataset":
        mean, std = [float(m) for m in spec["mean"]], [float(s) for s in spec["std"]]
        kwargs = (
            v.FixedZeroMeanUnitVarianceKwargs(mean=mean[0], std=std[0])
            if channels == 1
            else v.FixedZeroMeanUnitVarianceAlongAxisKwargs(
                axis=v.AxisId("channel"), mean=mean, std=std
            )
        )
        steps.append(v.FixedZeroMeanUnitVarianceDescr(kwargs=kwargs))
    elif spec["mode"] == "zscore":
        kwargs = v.ZeroMeanUnitVarianceKwargs(axes=space, eps=1e-6)
        steps.append(v.ZeroMeanUnitVarianceDescr(kwargs=kwargs))
    else:
        if spec["mode"] == "robust":  # no bioimage.io operator for the noise floor
            logger.warning(
                "robust normalisation is exported as scale_range (percentiles %s): the same "
                "wherever an image's range exceeds the noise floor; dim or empty fields are "
                "stretched by other tools where Scarce keeps them dark",
                spec["percentiles"],
            )
        lo, hi = (float(p) for p in spec["percentiles"])
        kwargs = v.ScaleRangeKwargs(axes=space, min_percentile=lo, max_percentile=hi, eps=1e-6)
        steps.append(v.ScaleRangeDescr(kwargs=kwargs))
    return steps


def test_crop(image: np.ndarray, multiple: int, minimum: int, path) -> np.ndarray:
    """The top-left square ``(C, S, S)`` of a test image, S a multiple of ``multiple``.

    Raises
    ------
    scarce.errors.InputError
        If the image is smaller than ``minimum`` pixels on a side.
    """
    side = min(image.shape[1], image.shape[2], TEST_SIDE) // multiple * multiple
    if side < minimum:
        raise InputError(
            f"{path}: test image {image.shape[1]}x{image.shape[2]} is smaller than the "
            f"model's smallest input ({minimum} px); pass a larger --test-image"
        )
    return np.ascontiguousarray(image[:, :side, :side])


def _test_image(ckpt: dict, given) -> tuple[Path, np.ndarray]:
    """The test image: ``given``, else the first test image recorded at training."""
    recorded = (ckpt["extras"].get("dataset") or {}).get("test_images") or []
    path = Path(given) if given else (Path(recorded[0]) if recorded else None)
    if path is None:
        raise InputError(
            "the checkpoint records no test image (trained before Scarce recorded them, or "
            "without a test database); pass one with --test-image"
        )
    if not path.is_file():
        raise MissingInputError(f"{path}: test image not found; pass one with --test-image")
    return path, read_image(path)


def _axes(v, channel_names, size, px, halo=None):
    """(batch, channel, y, x) axes; ``halo`` given: output axes sized like the input."""
    space = []
    for name in ("y", "x"):
        unit = {"unit": "micrometer", "scale": float(px)} if px else {}
        if halo is None:
            space.append(v.SpaceInputAxis(id=v.AxisId(name), size=size, **unit))
        else:
            ref = v.SizeReference(tensor_id=v.TensorId("raw"), axis_id=v.AxisId(name))
            space.append(v.SpaceOutputAxisWithHalo(id=v.AxisId(name), size=ref, halo=halo, **unit))
    names = [v.Identifier(n) for n in channel_names]
    return [v.BatchAxis(), v.ChannelAxis(channel_names=names), *space]


def _weights(v, model_path, folder: Path):
    """TorchScript and ONNX weights descriptions (files written into ``folder``)."""
    import onnx

    ts = export_network(model_path, "torchscript", folder / "weights.pt")
    ox = export_network(model_path, "onnx", folder / "weights.onnx")
    opset = max(o.version for o in onnx.load(str(ox)).opset_import if o.domain in ("", "ai.onnx"))
    version = v.Version(torch.__version__.split("+")[0])
    return v.WeightsDescr(
        torchscript=v.TorchscriptWeightsDescr(source=ts, pytorch_version=version),
        onnx=v.OnnxWeightsDescr(source=ox, opset_version=opset, parent="torchscript"),
    )


def _people(v, ckpt, authors, license_id, cite):
    """Authors, licence and citations: flags, else dataset.yaml, else defaults."""
    dataset = ckpt["extras"].get("dataset") or {}
    names = authors or dataset.get("authors") or [getpass.getuser()]
    entries = [dict(c) for c in (cite or dataset.get("cite") or [])] + [UNET_CITATION]
    citations = [v.CiteEntry(text=c["text"], doi=c.get("doi"), url=c.get("url")) for c in entries]
    chosen = license_id or dataset.get("license") or DEFAULT_LICENSE
    try:
        licence = v.LicenseId(chosen)
    except ValueError as exc:
        raise InputError(
            f"licence {chosen!r} is not an SPDX identifier bioimage.io accepts (e.g. "
            "CC-BY-4.0, MIT, BSD-3-Clause); pass --license or set license in dataset.yaml"
        ) from exc
    return [v.Author(name=n) for n in names], licence, citations


def export_bioimageio(
    model_path,
    out,
    *,
    test_image=None,
    name: str | None = None,
    description: str | None = None,
    authors: list[str] | None = None,
    license_id: str | None = None,
    cite: list[dict] | None = None,
    check: bool = True,
) -> Path:
    """Write a bioimage.io model package (zip) of a segmentation checkpoint.

    Parameters
    ----------
    model_path : path-like
        Checkpoint file or run folder.
    out : path-like
        The ``.zip`` to write (temp file, then rename).
    test_image : path-like, optional
        Image for the test tensors; default: the first test image recorded at training.
    name, description : str, optional
        Default: from the run folder and the training data.
    authors : list of str, optional
    license_id : str, optional
        SPDX identifier.
    cite : list of dict, optional
        ``{"text", "doi" or "url"}`` each; the U-Net paper is always added.
    check : bool
        Run ``bioimageio.core.test_model`` on the package (raises if it fails).

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    scarce.errors.InputError
        Missing extras, no or too small test image, unknown licence, a model trained on
        downscaled images (``data.downscale``).
    RuntimeError
        If the written package fails ``bioimageio.core.test_model``.
    """
    v = _spec()
    from bioimageio.spec import save_bioimageio_package

    out = Path(out)
    model, ckpt = load_model(model_path, "cpu")
    meta, target = export_metadata(model, ckpt), target_of(ckpt)
    if (meta["scale"] or {}).get("downscale", 1) != 1:
        raise InputError(
            f"{model_path}: trained on images shrunk {meta['scale']['downscale']}x "
            "(data.downscale); bioimage.io preprocessing has no resize step, so the package "
            "would be wrong: export it as TorchScript/ONNX (its .json names the factor)"
        )
    multiple, depth = int(model.size_multiple), context_depth(model)
    smallest = -(-(2 * depth + multiple) // multiple) * multiple
    image_path, image = _test_image(ckpt, test_image)
    crop = test_crop(image, multiple, smallest, image_path)
    probs = predict_image(model, crop, ckpt, tile_size=crop.shape[1], tta=False).numpy()
    px = pixel_size_of(ckpt)
    channels = (ckpt["extras"].get("dataset") or {}).get("channel_names") or [
        f"channel{c}" for c in range(crop.shape[0])
    ]
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
        folder = Path(tmp).resolve()
        np.save(folder / "test_input.npy", crop[None].astype(np.float32))
        np.save(folder / "test_output.npy", probs[None].astype(np.float32))
        tifffile.imwrite(folder / "sample_input.tif", crop[None])  # FAIR: an image file too
        tifffile.imwrite(folder / "sample_output.tif", probs[None].astype(np.float32))
        docs.cover(crop, probs, folder / "cover.png")
        (folder / "README.md").write_text(
            docs.readme(ckpt, meta, image_path, crop.shape[1], multiple)
        )
        people = _people(v, ckpt, authors, license_id, cite)
        size = v.ParameterizedSize(min=smallest, step=multiple)
        descr = v.ModelDescr(
            name=name or docs.default_name(ckpt),
            description=description or docs.default_description(ckpt, target),
            authors=people[0],
            license=people[1],
            cite=people[2],
            documentation=v.FileDescr(source=folder / "README.md"),
            covers=[v.FileDescr(source=folder / "cover.png")],
            tags=["segmentation", "unet", "scarce", "2d", "pytorch", "onnx"],
            inputs=[
                v.InputTensorDescr(
                    id=v.TensorId("raw"),
                    axes=_axes(
                        v, [identifier(c, f"c{i}") for i, c in enumerate(channels)], size, px
                    ),
                    test_tensor=v.FileDescr(source=folder / "test_input.npy"),
                    sample_tensor=v.FileDescr(source=folder / "sample_input.tif"),
                    preprocessing=preprocessing(meta["normalization"], crop.shape[0]),
                )
            ],
            outputs=[
                v.OutputTensorDescr(
                    id=v.TensorId("probabilities"),
                    axes=_axes(
                        v,
                        [identifier(c, f"class{i}") for i, c in enumerate(meta["class_names"])],
                        None,
                        px,
                        halo=depth,
                    ),
                    test_tensor=v.FileDescr(source=folder / "test_output.npy"),
                    sample_tensor=v.FileDescr(source=folder / "sample_output.tif"),
                    postprocessing=[v.SoftmaxDescr(kwargs=v.SoftmaxKwargs(axis="channel"))],
                )
            ],
            weights=_weights(v, model_path, folder),
            config={"scarce": {k: meta[k] for k in ("normalization", "target", "class_names")}},
        )
        with atomic.atomic_output(out) as part:
            save_bioimageio_package(descr, output_path=part)
    if check:
        check_package(out)
    logger.info("bioimage.io package %s (test image %s, %d px)", out, image_path, crop.shape[1])
    return out


def check_package(path) -> None:
    """Run ``bioimageio.core.test_model`` on a package; raise RuntimeError with its summary."""
    from bioimageio.core import test_model

    summary = test_model(str(path))
    if summary.status != "passed":
        raise RuntimeError(f"{path}: bioimageio test failed:\n{summary.format()}")


__all__ = ["check_package", "export_bioimageio", "preprocessing", "test_crop"]

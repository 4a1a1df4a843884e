"""The human-readable parts of a bioimage.io package: README, cover image, name, description.

The README says what the model was trained on (folder, images, pixel size, description from
``dataset.yaml``), how (network, patch, batch, steps, loss, normalisation, precision: from the
checkpoint's config), how well (the run's ``summary.json``), and how to run it in Fiji
(deepImageJ), QuPath, ilastik, napari and Python.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _run_summary(ckpt: dict) -> dict:
    """The run's ``summary.json`` (``RUN/checkpoints/x.pt`` -> ``RUN/summary.json``), or {}."""
    path = Path(ckpt.get("path") or ".").parent.parent / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def default_name(ckpt: dict) -> str:
    """``Scarce <model> on <data folder>``."""
    folder = (ckpt["extras"].get("dataset") or {}).get("images")
    data = Path(folder).parent.name if folder else Path(ckpt.get("path", "model")).parents[1].name
    return f"Scarce {ckpt['model']['name']} {data}".strip()


def default_description(ckpt: dict, target) -> str:
    """One sentence: the classes and the data."""
    dataset = ckpt["extras"].get("dataset") or {}
    about = dataset.get("description") or "microscopy images"
    classes = ", ".join(target.class_names)
    return f"2D semantic segmentation ({classes}; target {target.rule}) of {about}, by Scarce."


def _metrics(ckpt: dict) -> str:
    summary = _run_summary(ckpt)
    last = summary.get("last_eval") or {}
    if not last:
        return "No run summary was found beside the checkpoint.\n"
    rows = "\n".join(
        f"| {k} | {v:.4f} |" for k, v in last.items() if k.startswith(("iou_", "dice_", "mean_"))
    )
    return (
        f"Test split at step {last.get('step')} (stop reason: {summary.get('stop_reason')}, "
        f"best test loss {summary.get('best_test_loss', float('nan')):.4f} at step "
        f"{summary.get('best_step')}):\n\n| metric | value |\n|---|---|\n{rows}\n"
    )


def readme(ckpt: dict, meta: dict, test_image, side: int, multiple: int) -> str:
    """The package's ``README.md`` (markdown)."""
    cfg, dataset = ckpt.get("config", {}), ckpt["extras"].get("dataset") or {}
    data, optim = cfg.get("data", {}), cfg.get("optim", {})
    norm = meta["normalization"]
    return f"""# {default_name(ckpt)}

Made with [Scarce](https://github.com/) (`scarce export --format bioimageio`).

## Training data

- images: `{dataset.get("images", "not recorded")}` ({dataset.get("train_images", "?")} source
  images in the training split)
- description: {dataset.get("description") or "not given"}
- pixel size: {dataset.get("pixel_size_um") or "not given"} um
- classes: {", ".join(meta["class_names"])} (target `{meta["target"]}`, masks `{meta["mask_kind"]}`)

## How it was trained

- network: `{ckpt["model"]["name"]}` {json.dumps(ckpt["model"]["arguments"])}
- patch {data.get("patch_size")} px, batch {data.get("batch_size")}, up to
  {cfg.get("max_steps")} steps, loss `{cfg.get("loss", {}).get("name")}`, AdamW learning rate
  {optim.get("learning_rate")} (`{optim.get("schedule")}`), precision `{cfg.get("amp")}`
- normalisation `{norm["mode"]}` (percentiles {norm["percentiles"]}, mean {norm["mean"]},
  std {norm["std"]}): the package's preprocessing does the same

## Validation

Scarce evaluated the model on the held-out test split of its training data during training.
{_metrics(ckpt)}
The package passes `bioimageio test` (its TorchScript and ONNX weights reproduce the test
tensors, which Scarce's own sliding-window prediction made).

## Use

Input `raw` (batch, channel, y, x), any size `min + n * {multiple}` px; output
`probabilities` (batch, class, y, x) after softmax; crop `halo` px at tile borders. The test
tensors are the top-left {side} x {side} px of `{Path(test_image).name}`;
`scarce predict --tile-size {side}` gives the same output on that crop.

- **Fiji**: install deepImageJ (update site), *Plugins > deepImageJ > Install model*, choose this
  zip; then *deepImageJ Run* on an open image.
- **QuPath** (>= 0.5): the *QuPath bioimage.io* extension (*Extensions > Bioimage Model Zoo*) or
  the pixel classifier of the InstanSeg/deep-java-library extension, with this zip.
- **ilastik** (>= 1.4): the *Neural Network Classification* workflow, load this zip.
- **napari**: the Scarce plugin (`pip install 'scarce[napari]'`) or `napari-bioimageio`.
- **Python**: `bioimageio predict model.zip --input image.npy` (bioimageio.core).
"""


def cover(image: np.ndarray, probs: np.ndarray, path) -> None:
    """A 2:1 PNG: the test image (first channel) and its class map (outlines in colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    channel = image[0].astype(np.float32)
    lo, hi = np.percentile(channel, (1, 99.8))
    fig, axes = plt.subplots(1, 2, figsize=(6, 3), dpi=128)
    axes[0].imshow(channel, cmap="gray", vmin=lo, vmax=hi)
    axes[1].imshow(channel, cmap="gray", vmin=lo, vmax=hi)
    classes = probs.argmax(0)
    axes[1].imshow(np.ma.masked_equal(classes, 0), cmap="tab10", alpha=0.45, vmin=0, vmax=9)
    for ax, title in zip(axes, ("input", "prediction")):
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["cover", "default_description", "default_name", "readme"]

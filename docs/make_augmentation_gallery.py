"""Draw docs/augmentations.png: one sample and 8 augmentations of it, with the mask outline.

Usage (from the repository root)::

    .venv/bin/python docs/make_augmentation_gallery.py --data ../shared/data/bbbc039

The augmentation settings come from a training config (the ``default`` preset, the
recommended one with elastic deformation on), so the picture shows what training sees.
The image is normalised by percentiles, like ``data.normalization: percentile``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from skimage.segmentation import find_boundaries  # noqa: E402

from scarce.config import load_config  # noqa: E402
from scarce.data.augment import augment_patch, crop_patch, draw_params  # noqa: E402
from scarce.data.normalize import normalization_params, normalization_spec  # noqa: E402
from scarce.io import list_image_files, read_image, read_mask  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def describe(params) -> str:
    """Panel title: geometry on the first line, photometric transforms on the second."""
    flips = "+".join(a for a, on in (("x", params.flip_x), ("y", params.flip_y)) if on)
    geometry = [f"flip {flips}"] if flips else []
    geometry += [f"{params.angle:.0f}°", f"scale {params.scale[0]:.2f}/{params.scale[1]:.2f}"]
    photometric = []
    if params.blur_sigma is not None:
        photometric.append(f"blur σ {params.blur_sigma:.1f} px")
    if params.noise_sigma is not None:
        photometric.append(f"noise {params.noise_sigma:.0%}")
    return ", ".join(geometry) + "\n" + (", ".join(photometric) or "no blur, no noise")


def show(ax, patch: np.ndarray, mask: np.ndarray, title: str) -> None:
    """Grey image (first channel, clipped to 0..1) with the mask outline in orange."""
    rgb = np.repeat(np.clip(patch[0], 0.0, 1.0)[..., None], 3, axis=2)
    rgb[find_boundaries(mask, mode="inner")] = (1.0, 0.55, 0.0)
    ax.imshow(rgb, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def main(argv: list[str] | None = None) -> Path:
    """Make the gallery; returns the path of the PNG written.

    Raises
    ------
    FileNotFoundError
        If ``--data`` has no ``images/`` and ``masks/`` folder with a matching pair.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        default=str(ROOT.parent / "shared" / "data" / "bbbc039"),
        help="dataset folder with images/ and masks/ (bbbc039 or nist_rpe)",
    )
    parser.add_argument("--index", type=int, default=0, help="which image (sorted order)")
    parser.add_argument("--config", default="default", help="preset name or YAML file")
    parser.add_argument("--patch", type=int, default=256, help="patch side, pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "augmentations.png"))
    args = parser.parse_args(argv)

    data = Path(args.data)
    if not (data / "images").is_dir() or not (data / "masks").is_dir():
        raise FileNotFoundError(f"{data} needs images/ and masks/ folders (e.g. bbbc039)")
    image_path = list_image_files(data / "images")[args.index]
    masks = {p.stem: p for p in list_image_files(data / "masks")}
    if image_path.stem not in masks:
        raise FileNotFoundError(f"no mask for {image_path.name} in {data / 'masks'}")
    image, mask = read_image(image_path), read_mask(masks[image_path.stem])
    offset, scale = normalization_params(image, normalization_spec("percentile", (1.0, 99.8)))
    cfg = load_config(args.config).augment
    rng = np.random.default_rng(args.seed)
    centre = (image.shape[1] / 2, image.shape[2] / 2)

    fig, axes = plt.subplots(3, 3, figsize=(7.5, 8.0), layout="constrained")
    patch, patch_mask = crop_patch(image, mask, centre, args.patch, offset=offset, scale=scale)
    show(axes[0, 0], patch, patch_mask, "original")
    for ax in axes.flat[1:]:
        params = draw_params(cfg, args.patch, rng)
        patch, patch_mask = augment_patch(
            image, mask, centre, args.patch, cfg, rng, offset=offset, scale=scale, params=params
        )
        show(ax, patch, patch_mask, describe(params))
    fig.suptitle(
        f"{data.name}: {image_path.stem[:40]}  (config {Path(args.config).name}, elastic on)",
        fontsize=9,
    )
    out = Path(args.out)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")
    return out


if __name__ == "__main__":
    main()

"""``scarce demo``: the whole pipeline on a real dataset in a few minutes on a CPU.

ingest (every 5th image by sorted name is test) -> train for ``minutes`` with the quick-cpu
preset -> predict the test images -> evaluate -> overlays. Prints where everything is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from scarce.config import load_config, override
from scarce.errors import MissingInputError
from scarce.io import list_image_files, read_image, read_mask, stem_of

logger = logging.getLogger("scarce")


def every_nth_split(images_dir: str | os.PathLike, n: int = 5) -> dict:
    """Split by sorted file name: every ``n``-th image (0-based index % n == n - 1) is test.

    Returns
    -------
    dict
        ``{"train": [stems], "test": [stems]}``.
    """
    stems = [stem_of(p) for p in list_image_files(images_dir)]
    return {
        "train": [s for i, s in enumerate(stems) if i % n != n - 1],
        "test": [s for i, s in enumerate(stems) if i % n == n - 1],
    }


def _link_split(src: Path, stems: set[str], dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in list_image_files(src):
        if stem_of(f) in stems and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())


def save_overlays(images: Path, truth: Path, pred: Path, out: Path, limit: int = 8) -> None:
    """PNG per image: the image with truth (green) and prediction (magenta) outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    out.mkdir(parents=True, exist_ok=True)
    for f in list_image_files(images)[:limit]:
        image = read_image(f).astype(np.float32)
        show = image[:3].transpose(1, 2, 0) if image.shape[0] == 3 else image[0]
        lo, hi = np.percentile(show, (1, 99.5))
        rgb = np.clip((show - lo) / max(hi - lo, 1e-6), 0, 1)
        rgb = np.dstack([rgb] * 3) if rgb.ndim == 2 else rgb
        t = read_mask(next(p for p in list_image_files(truth) if stem_of(p) == stem_of(f)))
        p = read_mask(pred / f"{stem_of(f)}.tif")
        rgb[find_boundaries(t, mode="inner")] = (0, 1, 0)
        rgb[find_boundaries(p, mode="inner")] = (1, 0, 1)
        plt.imsave(out / f"{stem_of(f)}.png", rgb)


def run_demo(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    minutes: float = 4.0,
    config: str | os.PathLike | None = None,
) -> dict:
    """Ingest ``data`` (``images/`` + ``masks/``), train, predict, evaluate; return the metrics.

    Raises
    ------
    MissingInputError
        If ``data`` has no ``images/`` and ``masks/`` folders (the message says what to pass).
    """
    from scarce.data.ingest import ingest
    from scarce.segment.evaluate import evaluate_folders, format_summary
    from scarce.segment.predict import predict_files
    from scarce.segment.task import train

    data, out = Path(data), Path(out)
    if not (data / "images").is_dir() or not (data / "masks").is_dir():
        raise MissingInputError(
            f"{data}: expected a folder with images/ and masks/ inside; pass one with "
            "`scarce demo --data DIR` (or `make demo DATA=DIR`), e.g. ../shared/data/nist_rpe"
        )
    cfg = override(
        load_config(config or "quick-cpu"), {"max_minutes": minutes, "max_steps": 100000}
    )
    split = every_nth_split(data / "images")
    db = out / "db"
    ingest(data / "images", data / "masks", db, split=split, overwrite=True, progress=False)
    run = out / "run"
    summary = train(db / "train.lmdb", db / "test.lmdb", run, cfg, overwrite=True)
    test_images, test_masks = out / "test" / "images", out / "test" / "masks"
    _link_split(data / "images", set(split["test"]), test_images)
    _link_split(data / "masks", set(split["test"]), test_masks)
    pred = out / "predictions"
    predict_files(run, test_images, pred, progress=False)
    report = out / "report"
    metrics = evaluate_folders(pred, test_masks, report)
    save_overlays(test_images, test_masks, pred, out / "overlays")
    print(format_summary(metrics))
    print(
        f"\nTrained {summary['steps']} steps ({summary['stop_reason']}).\n"
        f"run folder:  {run}  (log.txt, metrics.csv, plots/, checkpoints/best.pt)\n"
        f"predictions: {pred}\noverlays:    {out / 'overlays'} and {run / 'plots'}\n"
        f"metrics:     {report / 'metrics.json'}"
    )
    return metrics

"""The one path to the real datasets the tests use: ``../shared/data`` beside the repository."""

from __future__ import annotations

from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def synthetic_db(root, shapes, *, kind: str = "instance", radius: int = 6, test: int = 1, seed=0):
    """``DB_DIR`` of synthetic images (dark noise, bright disks) with disk masks, via ingest.

    Parameters
    ----------
    root : pathlib.Path
        Folder to create ``images/``, ``masks/`` and ``db/`` in.
    shapes : list of (int, int)
        ``(H, W)`` of each image, pixels.
    kind : {"instance", "class"}
        Instance labels 1..N per image, or a class map (disks = 1).
    radius : int
        Disk radius, pixels.
    test : int
        The last ``test`` images form the test split.
    """
    import numpy as np

    from scarce.data.ingest import ingest
    from scarce.io import write_label_image

    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    stems = []
    for i, (h, w) in enumerate(shapes):
        yy, xx = np.mgrid[:h, :w]
        mask = np.zeros((h, w), np.uint8)
        for label in range(1, 1 + max(1, h * w // (12 * radius) ** 2)):
            cy, cx = (
                rng.integers(radius, max(radius + 1, h - radius)),
                rng.integers(radius, max(radius + 1, w - radius)),
            )
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
            mask[disk & (mask == 0)] = label if kind == "instance" else 1
        image = (rng.normal(40, 8, (h, w)) + 150 * (mask > 0)).clip(0, 255).astype(np.uint8)
        stem = f"img{i:03d}"
        write_label_image(root / "images" / f"{stem}.tif", image)
        write_label_image(root / "masks" / f"{stem}.tif", mask)
        stems.append(stem)
    split = {"train": stems[: len(stems) - test], "test": stems[len(stems) - test :]}
    ingest(
        root / "images", root / "masks", root / "db", split=split, mask_kind=kind, progress=False
    )
    return root / "db"
